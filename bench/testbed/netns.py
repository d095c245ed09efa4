"""Network namespaces, veth pairs, a bridge and tc shaping, driven through `ip` and `tc`.

Every interface is created directly inside a namespace we own (`ip link add ... netns X`),
so the root namespace's links, addresses and routes are never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

BRIDGE = "br0"
HOST_IF = "eth0"
MTU = 1500
TC_ACT_SHOT = 2
SKF_AD_RANDOM = 0xFFFFF000 + 56  # classic BPF ancillary load: a random u32


class CommandError(RuntimeError):
    """An `ip`/`tc` command failed; carries the command and its stderr."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command quietly; raise CommandError with stderr when check and it fails."""
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def missing_tools() -> list[str]:
    """Names of required executables not on PATH."""
    return [t for t in ("ip", "tc") if shutil.which(t) is None]


def list_netns() -> list[str]:
    """Names of all named network namespaces."""
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_netns(name: str) -> None:
    """Create namespace `name` with its loopback up."""
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def del_netns(name: str) -> None:
    """Delete a namespace (its interfaces go with it); missing is fine."""
    run("ip", "netns", "del", name, check=False)


def netns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is `name`."""
    out = run("ip", "netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def add_bridge(ns: str) -> None:
    """Create and raise the bridge inside namespace `ns`."""
    run("ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge")
    # Forward immediately: a fresh port would otherwise sit in listening/learning for seconds.
    run("ip", "-n", ns, "link", "set", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    run("ip", "-n", ns, "link", "set", BRIDGE, "up")


def add_veth(host_ns: str, bridge_ns: str, port: str, address: str, prefix_len: int) -> None:
    """Connect `host_ns` (interface eth0 with `address`) to the bridge via bridge-side `port`."""
    run("ip", "link", "add", HOST_IF, "netns", host_ns, "type", "veth",
        "peer", "name", port, "netns", bridge_ns)
    run("ip", "-n", bridge_ns, "link", "set", port, "master", BRIDGE)
    run("ip", "-n", bridge_ns, "link", "set", port, "up")
    run("ip", "-n", host_ns, "addr", "add", f"{address}/{prefix_len}", "dev", HOST_IF)
    run("ip", "-n", host_ns, "link", "set", HOST_IF, "up")


def set_link(ns: str, dev: str, up: bool) -> None:
    """Administratively raise or lower `dev` in `ns`."""
    run("ip", "-n", ns, "link", "set", dev, "up" if up else "down")


def link_is_up(ns: str, dev: str) -> bool:
    """True when `dev` in `ns` is administratively up."""
    out = run("ip", "-n", ns, "-o", "link", "show", dev, check=False).stdout
    flags = out.split("<", 1)[-1].split(">", 1)[0].split(",") if "<" in out else []
    return "UP" in flags


def probe_qdisc(ns: str, kind_args: list[str]) -> bool:
    """True when the kernel accepts qdisc `kind_args` (tried on `lo` of scratch namespace `ns`)."""
    ok = run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", *kind_args,
             check=False).returncode == 0
    run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return ok


@dataclass(frozen=True)
class Shaping:
    """Egress shaping of one interface: rate (Mbit/s, None = unlimited), delay (ms), loss (%)."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0
    loss_pct: float = 0.0


QUEUE_FLOOR_BYTES = 1 << 20


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters for `rate_mbit`: a bucket of ~10 ms (≥ 16 KiB) and a queue of ~100 ms
    but at least 1 MiB. The floor matters at low rates: a 100 ms queue (125 KB at 10 Mb/s)
    overflows under one TCP burst of a single activation message, and the drops then cost
    200 ms retransmission timeouts - loss that nobody asked for (loss has its own knob)."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes * 0.010))
    limit = burst + max(QUEUE_FLOOR_BYTES, int(rate_bytes * 0.100))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


def qdisc_drops(ns: str, dev: str) -> int:
    """Packets the root qdisc of `dev` in `ns` has dropped so far (0 if it has none)."""
    out = run("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev, "root",
              check=False).stdout
    m = re.search(r"dropped (\d+)", out or "")
    return int(m.group(1)) if m else 0


def loss_bytecode(loss_pct: float) -> str:
    """Classic-BPF program (tc `bytecode` syntax) dropping each IP packet with `loss_pct` %."""
    threshold = min(0xFFFFFFFF, int(loss_pct / 100.0 * 2**32))
    # ld rand; jge threshold -> pass; ret SHOT; pass: ret OK
    prog = [(0x20, 0, 0, SKF_AD_RANDOM), (0x35, 1, 0, threshold), (0x06, 0, 0, TC_ACT_SHOT), (0x06, 0, 0, 0)]
    return f"{len(prog)}," + ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in prog)


def apply_shaping(ns: str, dev: str, shaping: Shaping, netem: bool) -> None:
    """Replace `dev`'s egress shaping in `ns`.

    With netem: root netem (delay, loss) and a tbf child (rate). Without netem (kernels built
    without CONFIG_NET_SCH_NETEM): tbf at root for rate and a classic-BPF random-drop filter
    on the clsact egress hook for loss; a delay then cannot be emulated and is refused earlier.
    """
    tc = ["ip", "netns", "exec", ns, "tc"]
    run(*tc, "qdisc", "del", "dev", dev, "root", check=False)
    run(*tc, "qdisc", "del", "dev", dev, "clsact", check=False)
    if netem and (shaping.delay_ms > 0 or shaping.loss_pct > 0):
        netem_args = ["netem", "delay", f"{shaping.delay_ms}ms", "loss", f"{shaping.loss_pct}%"]
        if shaping.rate_mbit is not None:
            # netem's own queue must hold a bandwidth-delay product plus the tbf backlog.
            netem_args += ["limit", "10000"]
        run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem_args)
        if shaping.rate_mbit is not None:
            run(*tc, "qdisc", "add", "dev", dev, "parent", "1:", "handle", "10:", *tbf_args(shaping.rate_mbit))
        return
    if shaping.rate_mbit is not None:
        run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf_args(shaping.rate_mbit))
    if shaping.loss_pct > 0:
        run(*tc, "qdisc", "add", "dev", dev, "clsact")
        # protocol ip only: dropping ARP would stall address resolution for whole seconds.
        run(*tc, "filter", "add", "dev", dev, "egress", "protocol", "ip", "bpf", "da",
            "bytecode", loss_bytecode(shaping.loss_pct))
