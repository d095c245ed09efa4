"""`python -m decolla.node`: run one DeColla node (leader, device or requester).

  leader     hosts the registrar (membership); add --compute to also be a device
  device     joins the leader's convention; the leader places a Worker on it
  requester  joins, runs inferences on --image files (or seeded images) and exits

Without --leader, a device or requester joins the leader whose announcement (UDP broadcast
on --host's network, signed with the cluster key; --discovery-port) it hears first.

Every socket of the node listens on --host only (default: loopback, or this machine's
address toward --leader). Beyond loopback it needs the cluster key (--key-file or
DECOLLA_KEY_FILE, made by `decolla keygen`) unless --insecure. A device or requester that
the leader does not answer within --join-timeout (not running, unreachable, or another
cluster key) exits with an error.

Shuts down cleanly on SIGINT/SIGTERM (stop members before the leader).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

from thespian.actors import ActorExitRequest

from decolla import emulation
from decolla import log as dlog
from decolla.actors import system
from decolla.helpformat import HelpFormatter
from decolla.runtime import discovery, keys
from decolla.runtime.dataplane import PORT_ENV
from decolla.runtime.messages import ConfigureRegistrar
from decolla.runtime.trace import merge_chrome

# The model, the registrar and the client import numpy: they are imported inside the
# functions below, after main() has set the BLAS thread counts that numpy reads on import.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m decolla.node", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--role", choices=("leader", "device", "requester"), default="device",
                   help="what this node is (see above)")
    p.add_argument("--leader", help="HOST:PORT of the leader (default: the one whose "
                                    "announcement arrives on --host's network, see "
                                    "--discovery-port)")
    p.add_argument("--port", type=int, default=None,
                   help="this node's admin port (default: leader 1900, others a free port)")
    p.add_argument("--host", default=None,
                   help="the one interface every socket listens on and the address advertised "
                        "(default: 127.0.0.1, or this machine's address toward --leader)")
    p.add_argument("--key-file", default=None,
                   help=f"the cluster key (made by `decolla keygen`; default: ${keys.KEY_ENV})")
    p.add_argument("--insecure", action="store_true",
                   help="listen beyond loopback without a cluster key: anyone who can reach "
                        "the node can run code on it")
    p.add_argument("--join-timeout", type=float, default=60.0,
                   help="device/requester: seconds to wait for the leader to answer")
    p.add_argument("--name", default=None, help="node name (default: hostname:port)")
    p.add_argument("--model", default="mobilenet_v2:seed=0",
                   help="model spec ('mobilenet_v2:seed=0,width=0.5') or a model file")
    p.add_argument("--threads", type=int, default=1, help="compute threads on this node")
    p.add_argument("--data-port", type=int, default=0,
                   help="device: TCP port of its data plane for chunk traffic (0: any free "
                        "port; -1: none, chunks come as actor messages)")
    p.add_argument("--compute", action="store_true", help="leader only: also compute chunks")
    p.add_argument("--dilate", type=float, default=None, metavar="F",
                   help="emulate a CPU F times slower than this machine's, continuously (time "
                        f"dilation, for testbeds; default ${emulation.ENV}, or 1: off)")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")
    p.add_argument("--log-level", default="info",
                   help="debug | info | warning | error: the least severe lines printed")
    p.add_argument("--heartbeat", type=float, default=0.5, help="leader: heartbeat period (s)")
    p.add_argument("--discovery-port", type=int, default=discovery.DEFAULT_PORT,
                   help="UDP port of the leader's announcements, broadcast on --host's network "
                        "and signed with the cluster key; leader: 0 announces nothing "
                        "(default: %(default)s)")
    # requester role
    p.add_argument("--image", action="append", default=[],
                   help="requester: a JPEG/PNG/WebP photo or .npy array (repeatable)")
    p.add_argument("--count", type=int, default=1, help="requester: seeded images when no --image")
    p.add_argument("--allocator", default="average",
                   help="requester: random | average | least | proportional | eft | learned "
                        "(the shipped policy) | learned:path=FILE.npz (default: %(default)s)")
    p.add_argument("--plan", default="auto",
                   help="requester: auto | single | layer (the paper's per-layer split) | fused | "
                        "block | block-gather | spatial | exchange, options as auto:OPT=V,... "
                        "(default: %(default)s)")
    p.add_argument("-k", type=int, default=None, help="chunks per stage (default 2 x devices)")
    p.add_argument("--trace", default=None, help="requester: write a Chrome trace JSON here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.role != "leader" and not args.leader and not args.discovery_port:
        p.error("--leader HOST:PORT is required when --discovery-port is 0")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.dilate is not None and not 1.0 <= args.dilate < float("inf"):
        p.error("--dilate must be a finite factor >= 1")
    if args.host in ("0.0.0.0", "::", ""):
        p.error("--host is the address other nodes reach this one at: one interface, not "
                f"{args.host!r}")
    return args


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the main loop polls."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ[PORT_ENV] = str(args.data_port)      # read by this node's worker
    if args.dilate is not None:     # before the kernels load, and for the actor processes
        os.environ[emulation.ENV] = repr(args.dilate)
        emulation.enable(args.dilate)
    args.host = system.system_host(args.host, args.leader)
    port = args.port or (1900 if args.role == "leader" else system.free_port(args.host))
    name = args.name or f"{socket.gethostname()}:{port}"
    dlog.configure(json=args.log_json, level=args.log_level, node=name, role=args.role)
    logger = dlog.get_logger("node")
    if not _use_key(args, logger):
        return 2
    if args.role != "leader" and not args.leader:
        logger.info("waiting for the leader's announcement", port=args.discovery_port,
                    timeout_s=args.join_timeout)
        found = discovery.find_leader(args.host, args.discovery_port, args.join_timeout, logger)
        if found is None:
            logger.error("no leader announced itself on this network; start one, or pass "
                         "--leader HOST:PORT", host=args.host, port=args.discovery_port)
            return 5
        logger.info("leader discovered", leader=found.leader, model=found.model,
                    digest=found.digest[:12])
        args.leader = found.leader
    if args.role == "requester":
        return _run_requester(args, name, port, logger)
    return _run_member(args, name, port, logger)


def _use_key(args, logger) -> bool:
    """Install the cluster key; False (after saying why) when the node must not start."""
    try:
        key = keys.load_key(args.key_file)
    except keys.ClusterKeyError as exc:
        logger.error("bad cluster key", error=str(exc))
        return False
    keys.install(key)
    if key is None and not system.is_loopback(args.host):
        if not args.insecure:
            logger.error(f"refusing to listen on {args.host} without a cluster key: make one "
                         "with `decolla keygen cluster.key`, copy it to every node and pass "
                         "--key-file (or --insecure on a network you trust)", host=args.host)
            return False
        logger.warning(f"INSECURE: listening on {args.host} without a cluster key; anyone who "
                       "can reach this node can run code on it", host=args.host)
    return True


def _run_member(args, name, port, logger) -> int:
    from decolla.actors.preload import preload
    from decolla.actors.registrar import Registrar
    from decolla.model import ModelError
    try:
        model = preload(args.model)
    except (ModelError, OSError) as exc:
        logger.error("cannot load model", model=args.model, error=str(exc))
        return 2
    digest = model.digest()
    leader = None
    if args.role == "device":
        system.parse_hostport(args.leader)
        leader = args.leader
    caps = system.capabilities(args.role, name, port, leader, digest=digest, model=args.model,
                               threads=args.threads,
                               compute=args.role == "device" or args.compute)
    stop = _Stop()
    announcer = None
    try:
        asys = system.start_system(caps, args.host)
    except Exception as exc:
        logger.error("cannot start actor system", port=port, error=str(exc))
        return system.EXIT_NO_ACTOR_SYSTEM
    try:
        probe = asys.createActor(system.ProcessInfoActor)
        info = asys.ask(probe, "who", 10) or {}
        asys.tell(probe, ActorExitRequest())
        if args.role == "device":
            try:
                if not system.wait_joined(asys, leader, args.join_timeout,
                                          lambda: stop.signum is not None):
                    return 0
            except TimeoutError as exc:
                logger.error("cannot join the cluster", error=str(exc))
                return 5
        if args.role == "leader":
            reg = asys.createActor(Registrar, globalName=system.REGISTRAR_NAME)
            reply = asys.ask(reg, ConfigureRegistrar(args.model, name, args.heartbeat,
                                                     max(2.5, 5 * args.heartbeat),
                                                     caps if args.compute else None), 60)
            if reply is None:
                logger.error("registrar did not start")
                return 4
            if args.discovery_port:
                announcer = discovery.Announcer(args.host, f"{args.host}:{port}", args.model,
                                                digest, args.discovery_port, log=logger).start()
        logger.info("node started", name=name, role=args.role, port=port, leader=leader,
                    model=args.model, digest=digest[:12], threads=args.threads,
                    pid=os.getpid(), admin_pgid=info.get("pgid"), admin_pid=info.get("ppid"))
        verdict = _Verdict(asys, name, logger) if args.role == "device" else None
        while stop.signum is None:
            if verdict is not None:
                verdict.check()
            time.sleep(0.2)
        logger.info("shutting down", signal=signal.Signals(stop.signum).name)
    finally:
        if announcer is not None:
            announcer.stop()
        asys.shutdown()
    logger.info("node stopped")
    return 0


class _Verdict:
    """A device's own log says whether the leader accepted it: a refused device (another
    model digest) logs the leader's reason and waits, saying so, for a leader that takes it."""

    PERIOD_S = 1.0

    def __init__(self, asys, name: str, logger):
        self.asys, self.name, self.logger = asys, name, logger
        self.said, self.next = None, 0.0

    def check(self) -> None:
        if self.said == "accepted" or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.PERIOD_S
        from decolla.actors.registrar import find_registrar
        from decolla.runtime.messages import Membership, StatusRequest
        try:
            with self.asys.private() as ctx:
                m = ctx.ask(find_registrar(self.asys), StatusRequest(), 2)
        except Exception:      # the leader is away; asked again later
            return
        if not isinstance(m, Membership):
            return
        reason = m.refused.get(self.name)
        if reason and self.said != reason:
            self.logger.error("refused by the leader; waiting for a leader that accepts this "
                              "node (stop it and start it with the leader's model)",
                              reason=reason)
            self.said = reason
        elif any(d.name == self.name for d in m.devices):
            self.logger.info("accepted by the leader")
            self.said = "accepted"


def _run_requester(args, name, port, logger) -> int:
    import numpy as np
    from decolla.api import Client, ClusterError
    from decolla.image_file import ImageFileError, load_image, model_facts
    stop = _Stop()
    try:
        client = Client(args.leader, name=name, port=port, bind=args.host,
                        allocator=args.allocator, plan=args.plan, k=args.k,
                        connect_timeout=args.join_timeout)
    except ClusterError as exc:
        logger.error("cannot join the cluster", error=str(exc))
        return 5
    with client:
        st = client.status()
        logger.info("node started", name=name, role="requester", port=port, leader=args.leader,
                    digest=st["digest"][:12], devices=[d["name"] for d in st["devices"]])
        facts = model_facts(st["model"], st["digest"])
        try:
            images = [load_image(p, client.input_shape, facts).array for p in args.image]
        except ImageFileError as exc:
            logger.error("bad image", error=str(exc))
            return 2
        images = images or [
            np.random.default_rng(i).standard_normal(client.input_shape).astype(np.float32)
            for i in range(args.count)]
        results = []
        for img in images:
            if stop.signum is not None:
                break
            r = client.infer(img)
            results.append(r)
            print(json.dumps({"request": r.request, "latency_ms": round(r.latency * 1e3, 2),
                              "top": r.top_k, "devices": r.devices_used,
                              "retries": r.retries, "plan": r.stats.get("plan"),
                              "allocator": r.stats.get("allocator")}), flush=True)
        if args.trace and results:
            with open(args.trace, "w") as fh:
                json.dump(merge_chrome([r.trace for r in results]), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
