"""Embedding API: run collaborative inference from an application.

    with LocalCluster(devices=3) as cluster:          # N device processes on this machine
        result = cluster.infer(image)
    with Client(leader="10.0.0.1:1900") as client:    # a real cluster
        result = client.infer(image)
        result.trace.save_chrome("trace.json")

`infer` is thread-safe and several requests may be in flight at once.

The cluster key: `key_file=` (default: the file DECOLLA_KEY_FILE names) is installed for
the whole process, since Thespian's serializer is process-wide; with neither, a Client
keeps the key the process already has (e.g. a LocalCluster's). One key per process.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from thespian.actors import ActorExitRequest

from decolla.actors import system
from decolla.actors.registrar import wait_for_registrar
from decolla.actors.requester import Requester
from decolla.allocators import make_allocator
from decolla.forward import check_image
from decolla.log import get_logger
from decolla.node_process import ClusterError, NodeProcess
from decolla.result import Result, top_k
from decolla.runtime import keys
from decolla.runtime.messages import (ChunkEvents, ConfigureRequester, InferError, InferReply, InferRequest,
                              Membership, StatusRequest)
from decolla.runtime.trace import Trace

log = get_logger("api")
PORT_TRIES = 3        # starts of a node whose port another process took meanwhile


class InferenceError(RuntimeError):
    """An inference the cluster could not complete (timeout, no device, repeated failures)."""


def use_key(key_file: str | None = None) -> bytes | None:
    """Install the key in `key_file` (or DECOLLA_KEY_FILE) for this process and return
    the process's key; with neither, the key already installed stays (ClusterKeyError
    for a bad file)."""
    key = keys.load_key(key_file)
    if key is not None:
        keys.install(key)
    return keys.installed()


class ClusterMember:
    """A requester node in a cluster's convention: joins, asks the registrar, leaves."""

    close_linger_s = 0.0         # time given to exit requests before the system stops

    def _join(self, leader: str, name: str, port: int | None, bind: str | None,
              connect_timeout: float) -> None:
        system.parse_hostport(leader)
        self.leader, self.name = leader, name
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._asys = None
        self._requester = None
        self._asys = system.start_system(
            system.capabilities("requester", name, port or 0, leader), bind)
        try:
            self._registrar = wait_for_registrar(self._asys, leader, connect_timeout,
                                                 ClusterError)
        except BaseException:
            self.close()
            raise

    # The actor asked for membership: the registrar, or (a Client) its own requester, which
    # holds the snapshot pushed to it and follows the leader across restarts.
    def _membership_source(self):
        return self._registrar

    def membership(self, timeout: float = 10.0) -> Membership:
        """The cluster's current membership snapshot."""
        with self._asys.private() as ctx:
            m = ctx.ask(self._membership_source(), StatusRequest(), timeout)
        if not isinstance(m, Membership):
            raise ClusterError(f"leader {self.leader} did not answer a status request")
        return m

    def status(self, timeout: float = 10.0) -> dict:
        """Devices (status, speed, load), refused nodes and the model digest."""
        m = self.membership(timeout)
        devices = [{"name": d.name, "status": d.status, "speed_gmacs": round(d.speed / 1e9, 3),
                    "available": round(d.available, 3), "queue": d.queue, "beats": d.beats,
                    "host": d.host, "pid": d.pid, "pgid": d.pgid, "threads": d.threads,
                    "data_plane": "%s:%d" % tuple(d.data_addr) if d.data_addr else ""}
                   for d in m.devices]
        return {"leader": self.leader, "model": m.model, "digest": m.digest,
                "input_shape": list(m.input_shape), "devices": devices, "refused": m.refused}

    def devices(self) -> list[str]:
        """Ready devices (runtime workers up), in name order."""
        return sorted(d.name for d in self.membership().devices if d.status == "ready")

    def wait_for_devices(self, n: int, timeout: float = 30.0) -> list[str]:
        """Block until at least `n` devices are ready; returns their names."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self.devices()
            if len(ready) >= n:
                return ready
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(ready)} of {n} devices ready after {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        """Leave the cluster and stop this client's actor system."""
        asys, self._asys = self._asys, None
        if asys is None:
            return
        try:
            if self._requester is not None:
                asys.tell(self._requester, ActorExitRequest())
                time.sleep(self.close_linger_s)
        finally:
            asys.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Watcher(ClusterMember):
    """A member that only reads the cluster's state (`decolla status`): it starts no
    requester, so joining and one status request are all it waits for."""

    def __init__(self, leader: str, bind: str | None = None, timeout: float = 10.0,
                 key_file: str | None = None):
        use_key(key_file)
        self._join(leader, f"watcher-{uuid.uuid4().hex[:8]}", None, bind, timeout)


class Client(ClusterMember):
    """Connection to a running cluster: joins its convention as a requester node.

    `plan`: "auto" (the planner: bytes, links and device speeds decide), or a named plan
    of decolla.plans ("layer" is the paper's per-layer split, "single" one device).
    `allocator`: random, average, least, proportional, eft, "learned" (the shipped trained
    policy) or "learned:path=FILE.npz".
    `compress`: lz4 on chunk traffic — "auto" where a device's link is slow enough that
    compressing saves more time than it costs, or always (True) or never (False).
    """

    def _membership_source(self):
        return self._requester or self._registrar

    def __init__(self, leader: str, name: str | None = None, port: int | None = None,
                 bind: str | None = None, plan: str = "auto", k: int | None = None,
                 allocator: str = "average", wire_dtype: str = "float32",
                 compress: bool | str = "auto",
                 deadline_slack: float = 4.0, deadline_floor: float = 0.5,
                 request_timeout: float = 120.0, connect_timeout: float = 30.0,
                 min_devices: int = 1, min_chunk_macs: int = 0, data_plane: bool = True,
                 key_file: str | None = None):
        self.request_timeout = request_timeout
        make_allocator(allocator)     # a bad name or policy file fails here, before joining
        use_key(key_file)
        self._join(leader, name or f"requester-{uuid.uuid4().hex[:8]}", port, bind,
                   connect_timeout)
        try:
            self._requester = self._asys.createActor(
                Requester, targetActorRequirements={system.CAP_NODE: self.name})
            cfg = ConfigureRequester(self._registrar, self.name, k, plan, allocator, wire_dtype,
                                     compress, deadline_slack, deadline_floor, request_timeout,
                                     min_chunk_macs, data_plane)
            ready = self._asys.ask(self._requester, cfg, connect_timeout)
            if ready is None or not getattr(ready, "ok", False):
                raise ClusterError(f"requester did not start: {getattr(ready, 'detail', 'timeout')}")
            st = self.status()
            self.input_shape = tuple(st["input_shape"])
            self.digest = st["digest"]
            if min_devices:
                self.wait_for_devices(min_devices, connect_timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ inference
    def infer(self, image, top: int = 5, timeout: float | None = None,
              on_event=None) -> Result:
        """Logits, top-k, latency and per-chunk trace for one image (H, W, 3).

        `on_event(dict)`, if given, is called in this thread for every chunk sent, won,
        reassigned or failed, as it happens. Raises TypeError/ValueError for a bad image,
        InferenceError if the cluster fails.
        """
        image = check_image(image, self.input_shape)
        with self._lock:
            rid = f"{self.name}/{next(self._ids)}"
        wait = timeout if timeout is not None else self.request_timeout + 15
        submitted = time.time()
        deadline = time.monotonic() + wait
        with self._asys.private() as ctx:
            reply = ctx.ask(self._requester, InferRequest(rid, image, top, on_event is not None),
                            wait)
            while isinstance(reply, ChunkEvents):
                for event in reply.events:
                    on_event(event.as_dict())
                reply = ctx.listen(max(0.0, deadline - time.monotonic()))
        answered = time.time()
        if reply is None:
            raise InferenceError(f"request {rid}: no answer within {wait:.0f} s")
        if isinstance(reply, InferError):
            if reply.kind == "input":
                raise ValueError(reply.error)
            raise InferenceError(f"request {rid}: {reply.error}")
        if not isinstance(reply, InferReply):
            raise InferenceError(f"request {rid}: unexpected reply {reply!r}")
        trace = Trace(rid, reply.started, reply.finished, list(reply.records), submitted, answered)
        return Result(rid, reply.logits, top_k(reply.logits, top), trace.span(), trace, reply.stats)




def _pythonpath() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + old if old else "")


class LocalCluster:
    """A leader and N device processes on this machine, plus a Client to them.

    Each device is a real `python -m decolla.node` process with its own actor
    system, listening on `host` only; `kill(name, sig)` signals a device's whole actor
    system (fault tests). The cluster key is `key_file`'s, else the process's, else a
    new one: written to a temporary file (0600) its nodes read, removed on close. The
    nodes' logs go to `log_dir`, else to a /tmp/decolla-cluster-* folder removed on close.
    """

    def __init__(self, devices: int = 3, model: str = "mobilenet_v2:seed=0", threads: int = 1,
                 host: str = "127.0.0.1", log_dir: str | None = None,
                 start_timeout: float = 60.0, heartbeat: float = 0.5,
                 key_file: str | None = None, **client_kw):
        self.model, self.threads, self.host = model, threads, host
        self.start_timeout = start_timeout
        self.own_log_dir = log_dir is None       # removed on close (logs read before)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="decolla-cluster-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.nodes: dict[str, NodeProcess] = {}
        self.client: Client | None = None
        key = use_key(key_file) or keys.generate()
        keys.install(key)
        fd, self.key_path = tempfile.mkstemp(prefix="decolla-", suffix=".key")
        os.close(fd)
        keys.write_key(self.key_path, key, overwrite=True)
        try:
            leader = self._start("leader", "leader", extra=["--heartbeat", str(heartbeat)])
            self.leader = f"{host}:{leader.port}"
            for i in range(devices):
                self._spawn(f"dev{i + 1}", "device")
            for node in list(self.nodes.values()):
                if node is not leader:
                    self._wait_started(node, respawn=True)
            self.client = Client(self.leader, min_devices=devices, connect_timeout=start_timeout,
                                 bind=host, **client_kw)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ processes
    def _spawn(self, name: str, role: str, model: str | None = None,
               extra: list[str] | None = None) -> NodeProcess:
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        port = self._pick_port()
        cmd = [sys.executable, "-m", "decolla.node", "--role", role, "--name", name,
               "--port", str(port), "--host", self.host, "--model", model or self.model,
               "--threads", str(self.threads), "--log-json"]
        if role != "leader":
            cmd += ["--leader", self.leader]
        cmd += extra or []
        return self._popen(NodeProcess(name, role, port, None, "", cmd=cmd))

    def _pick_port(self) -> int:
        port = system.free_port(self.host)
        while port in {n.port for n in self.nodes.values()}:   # free until its node binds it
            port = system.free_port(self.host)
        return port

    def _popen(self, node: NodeProcess) -> NodeProcess:
        """Start `node.cmd`, its output in a log file (a restart's in a new one)."""
        runs = sum(1 for n in os.listdir(self.log_dir) if n.startswith(f"{node.name}."))
        node.log_path = os.path.join(self.log_dir, f"{node.name}." + (f"{runs}." if runs else "")
                                     + "log")
        env = dict(os.environ, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1",
                   **{keys.KEY_ENV: self.key_path})
        with open(node.log_path, "wb") as fh:
            node.proc = subprocess.Popen(node.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        node.admin_pgid, node.started = None, {}
        self.nodes[node.name] = node
        return node

    def restart(self, name: str) -> NodeProcess:
        """Kill -9 a node's actor system and node process (if still running) and start it
        again with the same name, port and arguments: a crash and a restart (fault tests)."""
        node = self.nodes[name]
        self.kill(name, signal.SIGKILL)
        node.proc.wait(10)
        self._popen(node)
        self._wait_started(node)
        return node

    def _start(self, name: str, role: str, **kw) -> NodeProcess:
        """Spawn a node and wait until it has started."""
        return self._wait_started(self._spawn(name, role, **kw), respawn=True)

    def _wait_started(self, node: NodeProcess, respawn: bool = False) -> NodeProcess:
        """Wait until `node` has started; with `respawn`, a node whose port another process
        took between our pick and its bind starts again on another (the node returned)."""
        for _ in range(PORT_TRIES if respawn else 1):
            try:
                node.await_started(self.start_timeout)
                return node
            except ClusterError:
                if not respawn or node.alive() or \
                        node.proc.returncode != system.EXIT_NO_ACTOR_SYSTEM:
                    raise
            log.warning("a node's port was taken; starting it on another", node=node.name,
                        port=node.port)
            node = self._on_new_port(node)
        return self._wait_started(node)

    def _on_new_port(self, node: NodeProcess) -> NodeProcess:
        """Start `node`'s command again, on another port."""
        port = self._pick_port()
        cmd = list(node.cmd)
        cmd[cmd.index("--port") + 1] = str(port)
        del self.nodes[node.name]
        return self._popen(NodeProcess(node.name, node.role, port, None, "", cmd=cmd))


    def add_device(self, name: str, model: str | None = None, wait: bool = True,
                   extra: list[str] | None = None) -> NodeProcess:
        """Start one more device process (e.g. with another model, to see it refused;
        `extra`: more `decolla.node` arguments)."""
        node = self._spawn(name, "device", model=model, extra=extra)
        self._wait_started(node)
        if wait:
            deadline = time.monotonic() + self.start_timeout
            while name not in self.ready_devices():
                if time.monotonic() > deadline:
                    raise ClusterError(f"device {name} did not become ready")
                time.sleep(0.2)
        return node

    def ready_devices(self) -> list[str]:
        return [d["name"] for d in self.status()["devices"] if d["status"] == "ready"]


    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a node's whole actor system (admin + actors) and its node process."""
        self.nodes[name].kill(sig)

    def stop_node(self, name: str, timeout: float = 15.0) -> None:
        """Stop one node cleanly (SIGTERM), forcing it after `timeout`."""
        node = self.nodes.get(name)
        if node is None:
            return
        self._terminate([node], timeout)

    def _terminate(self, nodes: list[NodeProcess], timeout: float) -> None:
        for n in nodes:
            if n.alive():
                if n.admin_pgid:       # a stopped actor system could not shut down
                    try:
                        os.killpg(n.admin_pgid, signal.SIGCONT)
                    except (ProcessLookupError, PermissionError):
                        pass
                try:
                    n.proc.send_signal(signal.SIGCONT)
                    n.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for n in nodes:
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(5)
        for n in nodes:   # anything of its actor system still running is killed
            if n.admin_pgid:
                try:
                    os.killpg(n.admin_pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    # ------------------------------------------------------------ client side
    def infer(self, image, **kw) -> Result:
        return self.client.infer(image, **kw)

    def status(self) -> dict:
        return self.client.status()

    @property
    def input_shape(self) -> tuple:
        return self.client.input_shape

    @property
    def digest(self) -> str:
        return self.client.digest

    def close(self) -> None:
        """Stop the client, then the devices, then the leader (members before leader)."""
        client, self.client = self.client, None
        try:
            if client is not None:
                client.close()
        finally:
            members = [n for n in self.nodes.values() if n.role != "leader"]
            leaders = [n for n in self.nodes.values() if n.role == "leader"]
            self._terminate(members, 15.0)
            self._terminate(leaders, 15.0)
            if os.path.exists(self.key_path):
                os.unlink(self.key_path)
            if self.own_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
