"""`decolla` command line: infer, status, demo, plan, serve, keygen."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

from decolla import demo, log
from decolla.allocators import ALLOCATOR_NAMES
from decolla.api import Client, Watcher, use_key
from decolla.helpformat import use_everywhere
from decolla.image_file import (ImageFile, ImageFileError, LoadedImage, model_facts, model_input,
                                read_image_file)
from decolla.loader import load_model
from decolla.plans import PLANS, build_plan, parse_plan_name
from decolla.plans.auto import Profile, explain
from decolla.runtime import keys


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--leader", required=True, help="HOST:PORT of the cluster's leader")
    p.add_argument("--bind", default=None, help="local interface address to bind")
    p.add_argument("--key-file", default=None,
                   help=f"the cluster key (made by `decolla keygen`; default: ${keys.KEY_ENV})")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to reach the leader (and, for infer, a device) before giving "
                        "up (default: %(default)s)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allocator", default="average",
                   help=f"{' | '.join(ALLOCATOR_NAMES)} (the shipped trained policy) | "
                        "learned:path=FILE.npz (yours); default: %(default)s")
    p.add_argument("--plan", default="auto",
                   help=f"{' | '.join(PLANS)}, options as auto:OPT=V,...; 'layer' is the "
                        "paper's per-layer split (slow: tens of MB per inference); "
                        "default: %(default)s")
    p.add_argument("-k", type=int, default=None, help="chunks per stage (default 2 x devices)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "float16", "int8"),
                   help="tensor encoding on the wire")
    p.add_argument("--trace", default=None, help="write a Chrome trace JSON (open in Perfetto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decolla", description="Collaborative inference on small devices")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")
    p.add_argument("--log-level", default="warning",
                   help="debug | info | warning | error: the least severe lines printed")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("infer", help="classify an image on a running cluster")
    _client_args(pi)
    _run_args(pi)
    pi.add_argument("--image", default=None,
                    help="a JPEG/PNG/WebP photo (resized and normalised as the model expects) "
                         "or a .npy array: normalised float32 (H, W, 3), or uint8 pixels "
                         "(converted); default: seeded noise")
    pi.add_argument("--seed", type=int, default=0, help="seed of the noise image (no --image)")
    pi.add_argument("--top", type=int, default=5, help="classes printed, best first")
    pi.add_argument("--json", action="store_true", help="print the result as JSON")
    pi.add_argument("--request-timeout", type=float, default=60.0,
                    help="seconds the inference may take once sent (default: %(default)s)")
    ps = sub.add_parser("status", help="devices, load and model digest of a cluster")
    _client_args(ps)
    ps.add_argument("--json", action="store_true", help="print the status as JSON")
    pd = sub.add_parser("demo", help="start a local cluster: one device, the paper's plan "
                                     "and auto side by side, checked against decolla.forward")
    _run_args(pd)
    pd.add_argument("--devices", type=int, default=3, help="device processes (default: %(default)s)")
    pd.add_argument("--model", default="mobilenet_v2:seed=0",
                    help="model spec or file (default: %(default)s)")
    pd.add_argument("--runs", type=int, default=3,
                    help="timed runs per plan, after one warm-up run per device "
                         "(default: %(default)s)")
    pd.add_argument("--seed", type=int, default=0, help="seed of the input image")
    pd.set_defaults(trace="decolla-demo-trace.json")
    pp = sub.add_parser("plan", help="build a partition plan and show its stages, bytes and times")
    pp.add_argument("--explain", action="store_true", help="print the stage table (default)")
    pp.add_argument("--model", default="mobilenet_v2:seed=0", help="model spec or file")
    pp.add_argument("--plan", default="auto",
                    help=f"{' | '.join(PLANS)}, options as auto:OPT=V,...")
    pp.add_argument("--devices", type=int, default=3, help="devices the plan may use")
    pp.add_argument("-k", type=int, default=None, help="chunks per stage (default: devices)")
    pp.add_argument("--bandwidth-mbit", type=float, default=100.0,
                    help="link speed between the requester and the devices (Mbit/s)")
    pp.add_argument("--wire-dtype", default="float16", choices=("float32", "float16", "int8"),
                    help="tensor encoding on the wire")
    pp.add_argument("--overhead-ms", type=float, default=2.0, help="cost per message")
    pp.add_argument("--gmacs", type=float, default=None,
                    help="device speed: pointwise GMAC/s, other kinds scaled alike (default: "
                         "the cost model's table, printed in the plan's header)")
    pp.add_argument("--local", action="store_true",
                    help="one-chunk stages run on the requester's own device (no bytes)")
    pp.add_argument("--per-device-links", action="store_true",
                    help="each device has its own link of that bandwidth (default: one shared)")
    pp.add_argument("--json", action="store_true", help="print the planner's notes as JSON")
    _serve_parser(sub.add_parser("serve", help="requester web page, JSON API and live "
                                               "cluster view (the gateway extra)"))
    pk = sub.add_parser("keygen", help="write a new cluster key (mode 0600)")
    pk.add_argument("path", nargs="?", default="cluster.key", help="where to write the key")
    pk.add_argument("--force", action="store_true", help="replace an existing key file")
    return use_everywhere(p)


def _serve_parser(pg: argparse.ArgumentParser) -> None:
    """The gateway's options, or, without the gateway extra, a command that says so: the
    runtime commands must work on a device with the runtime dependencies alone."""
    try:
        from decolla.gateway import server
    except ImportError as exc:
        reason = str(exc)
        pg.set_defaults(func=lambda args: _no_gateway(reason), any_arguments=True)
        return
    server.add_arguments(pg)          # its --key-file too
    pg.set_defaults(func=server.run)


def _no_gateway(reason: str) -> int:
    print(f"decolla serve: the gateway needs its extra dependencies ({reason}): "
          "pip install 'decolla[gateway]'", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    log.configure(json=args.log_json, level=args.log_level, node="cli")
    _sigterm_unwinds()
    try:
        handlers = {"infer": _infer, "status": _status, "demo": _demo, "plan": _plan,
                    "keygen": _keygen}
        if hasattr(args, "key_file"):
            use_key(args.key_file)
        return handlers[args.cmd](args) if args.cmd in handlers else args.func(args)
    except KeyboardInterrupt:
        return 130
    except (keys.ClusterKeyError, ImageFileError) as exc:
        print(f"decolla {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"decolla {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


def _sigterm_unwinds() -> None:
    """SIGTERM unwinds this process like Ctrl-C, so every Client and LocalCluster it holds
    shuts its actor system down (killed outright, its admin and requester processes would
    stay). Processes forked from this one later (Thespian's) keep the default action."""
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def _keygen(args) -> int:
    keys.write_key(args.path, overwrite=args.force)
    print(f"wrote a new cluster key to {args.path} (mode 0600); copy it to every node, "
          f"client and gateway of the cluster and pass --key-file {args.path}")
    return 0


def _plan(args) -> int:
    specs = load_model(args.model).layer_specs()
    opts = {"devices": args.devices, "bandwidth_mbit": args.bandwidth_mbit,
            "wire_dtype": args.wire_dtype, "overhead_ms": args.overhead_ms,
            "local": int(args.local), "shared_link": int(not args.per_device_links)}
    if args.gmacs:
        opts["gmacs"] = args.gmacs
    name, named = parse_plan_name(args.plan)
    opts.update(named)                  # options written in the plan name win over the flags
    prof = Profile.from_options(opts)
    plan = build_plan(specs, args.k or args.devices, args.plan,
                      **(opts if name == "auto" else {}))
    if args.json:
        print(json.dumps(plan.notes or {"stages": len(plan.stages)}, indent=1, default=str))
    else:
        print(explain(plan, specs, prof))
    return 0


def _input(f: ImageFile | None, seed, shape, facts) -> LoadedImage:
    if f is not None:
        return model_input(f, shape, facts)
    return LoadedImage(np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
                       ["no --image: classifying seeded noise (--image takes a photo)"])


def _infer(args) -> int:
    image = read_image_file(args.image) if args.image else None     # a wrong file fails here
    with Client(args.leader, bind=args.bind, allocator=args.allocator, plan=args.plan, k=args.k,
                wire_dtype=args.wire_dtype, connect_timeout=args.timeout,
                request_timeout=args.request_timeout) as client:
        st = client.status()
        facts = model_facts(st["model"], st["digest"])
        loaded = _input(image, args.seed, client.input_shape, facts)
        for level, lines in (("note", loaded.notes), ("warning", loaded.warnings)):
            for line in lines:
                print(f"decolla infer: {level}: {line}", file=sys.stderr)
        if facts.trained is False:
            print(f"decolla infer: warning: the cluster's model ({st['model']}) has seeded, "
                  "untrained weights: its labels mean nothing", file=sys.stderr)
        r = client.infer(loaded.array, top=args.top, timeout=args.request_timeout + 5)
    if args.trace:
        r.save_trace(args.trace)
    n = len(r.logits)
    top = [(cls, prob, facts.label(cls, n)) for cls, prob in r.top_k]
    out = {"request": r.request, "latency_ms": round(r.latency * 1e3, 2), "top": top,
           "model": st["model"], "trained": facts.trained, "plan": r.stats.get("plan"),
           "allocator": r.stats.get("allocator"),
           "devices": r.trace.devices(), "retries": r.retries, "bytes": r.bytes_moved,
           "phases_ms": {k: round(v * 1e3, 2) for k, v in r.trace.phases().items()}}
    if args.json:
        print(json.dumps(out))
    else:
        ph = out["phases_ms"]
        print(f"latency {out['latency_ms']} ms (the trace's span: waiting {ph['waiting']} ms "
              f"for plan, links and queue, running {ph['running']} ms, reply {ph['reply']} ms), "
              f"plan {out['plan']}, chunks per device {out['devices']}, retries {r.retries}, "
              f"bytes moved {out['bytes']}")
        for cls, prob, label in top:
            print(f"  {prob:6.1%}  {label}  (class {cls})")
    return 0


def _status(args) -> int:
    deadline = time.monotonic() + args.timeout     # one budget: joining, then the answer
    with Watcher(args.leader, bind=args.bind, timeout=args.timeout) as watcher:
        st = watcher.status(timeout=max(0.1, deadline - time.monotonic()))
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"leader {st['leader']}  model {st['model']}  digest {st['digest'][:16]}")
    print(f"{'device':16} {'status':13} {'GMAC/s':>7} {'free CPU':>8} {'queue':>5} {'host':12} "
          f"data plane")
    for d in st["devices"]:
        print(f"{d['name']:16} {d['status']:13} {d['speed_gmacs']:7.2f} {d['available']:8.2f} "
              f"{d['queue']:5d} {d['host']:12} {d['data_plane'] or '-'}")
    for name, reason in st["refused"].items():
        print(f"refused {name}: {reason}")
    return 0


def _demo(args) -> int:
    ok = demo.run(args.model, args.devices, args.runs, args.seed, plan=args.plan,
                  allocator=args.allocator, k=args.k, wire_dtype=args.wire_dtype, trace=args.trace)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
