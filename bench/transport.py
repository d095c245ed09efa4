"""Transport benchmark: what one message costs an actor, Thespian messages vs the data plane,
and what the data plane's protection costs.

    python -m bench.transport [--round-trips 300]

An echo actor (its own process, multiprocTCPBase on loopback) receives a payload and sends
2 KB back, `--round-trips` times per payload size (after a few that are not counted): as
Thespian actor messages, then on the data plane (decolla.runtime.dataplane) with each
protection of decolla.runtime.session: `plain` (the same binary frames without a tag:
what authentication costs), `auth` (HMAC-SHA256, DECOLLA_ENCRYPT=0) and `encrypt`
(ChaCha20-Poly1305, the default).
Reported per round trip: the mean wall time seen by the caller, the echo actor's CPU time
(user + system, from getrusage in the actor's process), which is what a Pi-class device
pays for every chunk it receives and answers, and the bytes it moves per second of its
CPU. Writes bench/results/transport.json and .md.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from dataclasses import dataclass

from thespian.actors import ActorTypeDispatcher

from bench.report import write_json_md
from decolla.actors.system import start_system
from decolla.runtime import channels, dataplane, frames, session
from decolla.runtime.messages import Message

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SIZES = (100, 25_000, 150_000)
WARMUP = 5                  # round trips before each measured row


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(repr=False)
class Payload(Message):
    """Bytes with a cheap repr (Thespian formats every message it sends)."""
    data: bytes


FRAMES = frames.Codec({1: Payload})


def protections() -> list[str]:
    """The data plane's protections, weakest first."""
    return [session.PLAIN, session.AUTH, session.ENCRYPT]


class Echo(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Answers every Payload with its first 2 KB, on the transport it came by."""

    CHANNELS = channels.table(channels.Channel(Payload, "echo", channels.Path.DATA))
    FRAMES = FRAMES
    RECEIVER = "echo"

    def receiveMsg_tuple(self, msg, sender):
        """("listen", protection): a listener of its own for that protection."""
        listener = dataplane.Listener(self.open_inbox(), dataplane.own_ip(self.myAddress),
                                      codec=FRAMES, protection=msg[1])
        self.listeners = getattr(self, "listeners", []) + [listener]
        self.send(sender, listener.address)

    def receiveMsg_str(self, msg, sender):
        if msg == "start":
            self.cpu0 = _cpu()
            self.send(sender, "ok")
        elif msg == "cpu":
            self.send(sender, _cpu() - self.cpu0)

    def receiveMsg_Payload(self, msg, sender):
        reply = Payload(msg.data[:2000])
        if isinstance(sender, dataplane.Connection):
            sender.send(reply)
        else:
            self.send(sender, reply)


class Driver(ActorTypeDispatcher):
    """Runs n actor-message round trips against the echo actor, then answers its caller."""

    def receiveMsg_tuple(self, msg, sender):
        self.echo, self.left, self.data = msg
        self.caller = sender
        self.send(self.echo, Payload(self.data))

    def receiveMsg_Payload(self, msg, sender):
        self.left -= 1
        if self.left:
            self.send(self.echo, Payload(self.data))
        else:
            self.send(self.caller, "done")


def run(round_trips: int) -> dict:
    # the nodes' own start: loopback only, Thespian frames tagged as in a cluster
    asys = start_system({"Admin Port": 0}, "127.0.0.1")
    rows = []
    try:
        echo, driver = asys.createActor(Echo), asys.createActor(Driver)
        inbox = dataplane.Inbox()
        conns = {}
        for p in protections():
            conns[f"data plane, {p}"] = conn = dataplane.Connection.connect(
                inbox, asys.ask(echo, ("listen", p), 10), FRAMES, p)
            if not conn.connected.wait(5) or conn.session.protection != p:
                raise RuntimeError(f"no {p} data-plane connection to the echo actor")
        for size in SIZES:
            data = b"x" * size
            for transport in ("actor messages", *conns):
                def trips(n):
                    if transport == "actor messages":
                        asys.ask(driver, (echo, n, data), 120)
                        return
                    for _ in range(n):
                        conns[transport].send(Payload(data))
                        while not any(isinstance(o, Payload) for _, o in inbox.drain()):
                            time.sleep(0)
                trips(WARMUP)              # first uses (buffers, code paths) are not counted
                asys.ask(echo, "start", 10)
                t0 = time.perf_counter()
                trips(round_trips)
                wall = (time.perf_counter() - t0) / round_trips
                cpu = asys.ask(echo, "cpu", 10) / round_trips
                rows.append({"payload_bytes": size, "transport": transport,
                             "wall_ms": wall * 1e3, "echo_cpu_ms": cpu * 1e3,
                             "mb_per_cpu_s": (size + min(size, 2000)) / max(cpu, 1e-9) / 1e6})
        for conn in conns.values():
            conn.close()
    finally:
        asys.shutdown()
    return {"round_trips": round_trips, "rows": rows,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "loadavg": os.getloadavg()}}


def table(res: dict) -> str:
    lines = ["# Transport: what one round trip costs the receiving actor", "",
             f"Echo actor on loopback, {res['round_trips']} round trips per row (payload in, "
             f"2 KB back); {res['machine']['cpus']} CPUs, load average at the end "
             f"{res['machine']['loadavg'][0]:.2f}. CPU = the echo actor's user + system time.",
             "", "| payload | transport | wall ms per round trip | echo actor CPU ms | "
             "MB/s per echo core |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['payload_bytes']:,} B | {r['transport']} | {r['wall_ms']:.3f} | "
                     f"{r['echo_cpu_ms']:.3f} | {r['mb_per_cpu_s']:.1f} |")
    lines += ["", "On a device k times slower than a host core, a chunk pays about k × the CPU "
              "column (≈ 8× on the testbed). `plain` is the data plane's framing without a "
              "tag (benchmark only), `auth` HMAC-SHA256 (DECOLLA_ENCRYPT=0), `encrypt` "
              "ChaCha20-Poly1305 (the default)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(RESULTS, "transport.json"))
    args = ap.parse_args(argv)
    res = run(args.round_trips)
    write_json_md(args.out, res, table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
