"""A node process started on this machine (by decolla.api.LocalCluster): its command,
log, start-up and end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field


class ClusterError(RuntimeError):
    """The cluster could not be reached or started."""


@dataclass
class NodeProcess:
    """A node process started by LocalCluster."""
    name: str
    role: str
    port: int
    proc: subprocess.Popen
    log_path: str
    admin_pgid: int | None = None
    started: dict = field(default_factory=dict)
    cmd: list = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def await_started(self, timeout: float) -> None:
        """Wait until its log says it started (ClusterError if it exits or takes too long)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if '"node started"' in line:
                    try:
                        self.started = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.admin_pgid = self.started.get("admin_pgid")
                    return
            if not self.alive():
                raise ClusterError(f"node {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_text()[-2000:])
            time.sleep(0.1)
        raise ClusterError(f"node {self.name} did not start in {timeout:.0f} s:\n"
                           + self.log_text()[-2000:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to its whole actor system (admin + actors) and its node process."""
        if self.admin_pgid:
            try:
                os.killpg(self.admin_pgid, sig)
            except ProcessLookupError:
                pass
        if self.alive():
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
