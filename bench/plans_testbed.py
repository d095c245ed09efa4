"""Plans on the testbed: latency of `auto` (and `spatial`) against one device, per bandwidth.

    sudo .venv/bin/python -m bench.plans_testbed [--bandwidths 1,10,100,1000] [--repeats 5]
        [--emulation dilation|quota]

3 emulated devices (network namespace, tc tbf on each device link, CPU slowed so the
model's whole forward (`--model`, MobileNetV2-224 by default; an `.onnx` file works too)
runs k≈8x slower than on one host core: a Pi-class device,
by `--emulation`: time dilation in the device processes, continuously slow, or a cgroup
CFS quota, see bench.plans_cluster), no background load, an edge host running the leader,
and an unshaped, unthrottled requester host running this module with --agent. Two
single-device baselines: mobile-only is the `single` plan through the same runtime (the
whole network as one chunk on one device with our kernels; image there, logits back);
`onnxruntime` runs the same weights exported to ONNX on one thread inside device 1 under
the same emulation (bench.ort_device; the image already there, so its latency is compute
only). Every plan's ratio is given against both. `auto` runs twice: told the bandwidth and the device
speed (the planner's best case) and as a user gets it (plain `auto`: the requester
measures the links, their bandwidth and whether they are shared, and plans for them);
`--plans` adds plans (default `exchange`). The plans take turns, `--block` repeats at a
time, so the shared host's drift hits them alike. Per bandwidth and plan: median latency
end to end and without the delivery of the first stage's input (the paper's convention),
bytes, correctness against the single-device forward; each request's per-chunk timeline
(halo bytes and halo waits included); the cost model's prediction for the plan (the
profile `auto` is told: bandwidth, calibrated speed, overheads). Ratios are from the same
run. Writes bench/results/plans_testbed_<emulation>.json and .md; `--headline` writes
plans_testbed_both.md from both emulations' files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import ort_device
from bench.plans_cluster import EMULATIONS, ask, plans_cluster

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ORT = "onnxruntime"


def predicted(model, plan: str, told: str = "") -> dict | None:
    """The cost model on `plan` (k = 3; `single`: 1) for `model` (a Model or a spec) under
    the options of `told` (the told `auto`'s profile; the plan's own options win):
    {"seconds": predicted wall time, "stages": one 'split xk (n layers)' per stage}; None
    where the plan cannot be built here."""
    from decolla.loader import load_model
    from decolla.plans import build_plan, parse_plan_name
    from decolla.plans.auto import Profile, stage_seconds
    name, opts = parse_plan_name(plan)
    if name == ORT:
        return None
    opts = {**parse_plan_name(told)[1], **opts}
    k = 1 if name == "single" else 3
    model = load_model(model) if isinstance(model, str) else model
    specs = model.layer_specs()
    try:
        built = build_plan(specs, k, name, model.input_shape, **opts)
    except Exception:
        return None
    prof = Profile.from_options(opts, k)
    by_name = {sp["name"]: sp for sp in specs}
    return {"seconds": float(sum(stage_seconds(st, by_name, prof) for st in built.stages)),
            "stages": [f"{'exchange' if st.exchange else st.split}"
                       f"{'+sum' if st.reduce == 'sum' else ''} x{len(st.chunks)} "
                       f"({len(st.layers)} layers)" for st in built.stages]}


def _more_told(args) -> list[str]:
    """The option strings of the extra told `auto` runs: `--min-gain G` is `--also-told
    min_gain=G`, and both may be given."""
    return ([f"min_gain={args.min_gain:g}"] if args.min_gain is not None else []) + \
        ([args.also_told] if args.also_told else [])


def _delivery(trace) -> float:
    """Seconds until the first stage's inputs had reached their devices."""
    recs = [r for r in trace.records if r.attempt == 0 and r.received is not None]
    if not recs:
        return 0.0
    first = min(r.stage for r in recs)
    return max(0.0, max(r.received - r.sent for r in recs if r.stage == first))


def _timeline(trace, t0: float) -> list:
    """Compact per-attempt rows (ms from the request's start) for reading where time went:
    stage, chunk, device, status, sent, received, start, end, returned, bytes in, bytes out,
    halo bytes in, ms waited for halos."""
    ms = lambda t: None if t is None else round((t - t0) * 1e3, 1)  # noqa: E731
    return [[r.stage, r.chunk, r.device, r.status, ms(r.sent), ms(r.received), ms(r.start),
             ms(r.end), ms(r.returned), r.bytes_in, r.bytes_out, r.halo_bytes,
             round(r.halo_wait_s * 1e3, 1)] for r in trace.records]


def agent(args) -> int:
    """Runs inside the requester host: one JSON command per stdin line, one JSON reply."""
    from decolla.api import Client
    from decolla.forward import forward
    from decolla.loader import load_model
    model = load_model(args.model)
    images = [np.random.default_rng(s).standard_normal(model.input_shape).astype(np.float32)
              for s in range(3)]
    refs = [forward(model, x) for x in images]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            k = 1 if cmd["plan"] == "single" else 3
            with Client(args.leader, bind=args.bind, plan=cmd["plan"], k=k, min_devices=3,
                        wire_dtype=cmd.get("wire_dtype", "float16"),
                        # no faults here: a generous deadline keeps slow links from
                        # triggering duplicate chunks that would only add traffic
                        deadline_floor=cmd["cap_s"] / 4, request_timeout=cmd["cap_s"]) as client:
                # warm-up: plans, and (3) one inference per device: a block's first chunk on
                # a device the warm-up missed ran up to 2x slower, mostly against `single`
                for _ in range(cmd.get("warmup", 1)):
                    client.infer(images[0], timeout=cmd["cap_s"])
                rows = []
                for i in range(cmd["repeats"]):
                    x, ref = images[i % 3], refs[i % 3]
                    t0, t0_wall = time.perf_counter(), time.time()
                    r = client.infer(x, timeout=cmd["cap_s"])
                    lat = time.perf_counter() - t0
                    rows.append({"latency_s": lat, "without_input_s": lat - _delivery(r.trace),
                                 "bytes": int(r.trace.bytes_moved()),
                                 "stages": int(r.stats.get("stages", 0)),
                                 "planned_mbit": r.stats.get("bandwidth_mbit"),
                                 "planned_shared": r.stats.get("shared_link"),
                                 "top1_ok": int(np.argmax(r.logits)) == int(np.argmax(ref)),
                                 "rel_err": float(np.abs(r.logits - ref).max() / np.abs(ref).max()),
                                 "timeline": _timeline(r.trace, t0_wall)})
            print(json.dumps({"ok": True, "result": rows}), flush=True)
        except Exception as exc:  # reported to the driver, which records the point as failed
            print(json.dumps({"ok": False, "error": repr(exc)}), flush=True)
    return 0


def drive(args) -> int:
    from bench.testbed import check_environment
    reason = check_environment()
    if reason:
        print(f"bench.plans_testbed needs the testbed: {reason}", file=sys.stderr)
        return 2
    bws = [float(b) for b in args.bandwidths.split(",")]
    doc = {"model": args.model, "k": args.k, "repeats": args.repeats, "block": args.block,
           "warmup": args.warmup,
           "points": [], "emulation": args.emulation,
           "name": args.name or f"plans_testbed_{args.emulation}",
           "overhead_ms": args.overhead_ms, "command": " ".join(sys.argv),
           "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    logs = Path("/tmp") / f"dcpl-ort-{os.getpid()}"
    logs.mkdir(exist_ok=True)
    # an imported model's own file serves onnxruntime as it is (export only checks it)
    onnx_path = args.model if ort_device.is_onnx(args.model) else str(logs / "model.onnx")
    doc["onnx_rel_err"] = ort_device.export(args.model, onnx_path) if args.ort else None
    # onnxruntime on an unthrottled host core: its slowdown on the emulated device beside k
    doc["onnx_host_ms"] = ort_device.host_seconds(onnx_path) * 1e3 if args.ort else None
    with plans_cluster("dcpl", args.model, args.k, bws[0], "bench.plans_testbed", [],
                       emulation=args.emulation) as pc:
        tb, proc = pc.tb, pc.agent
        doc["calibration"] = pc.calibration.as_dict()
        doc["emulation_line"] = pc.describe_emulation()
        doc["cpu_period_us"] = pc.tb.hosts["dev1"].cgroup.period_us
        doc["auto_gmacs"] = gmacs = pc.gmacs
        ort = ort_device.start(tb.host("dev1"), onnx_path, logs / "ort.log") if args.ort else None
        try:
            for bw in bws:
                for i in (1, 2, 3):
                    tb.set_bandwidth(f"dev{i}", bw)
                told = (f"gmacs={gmacs:.2f},overhead_ms={args.overhead_ms:g}"
                        + (f",device_overhead_ms={args.device_overhead_ms:g}"
                           if args.device_overhead_ms is not None else ""))
                plans = ["single", f"auto:bandwidth_mbit={bw:g},shared_link=0,{told}",
                         # what a user gets: links measured by the requester, speed
                         # from the devices' start-up calibration
                         "auto"]
                # the told auto again with more options (min_gain=1, max_mb=0, ...)
                plans += [f"auto:bandwidth_mbit={bw:g},shared_link=0,{opts},{told}"
                          for opts in _more_told(args)]
                if bw >= 100 and args.spatial:
                    plans.append("spatial")
                plans += [p for p in args.plans.split(",") if p]
                if ort is not None:
                    plans.append(ORT)
                # Plans take turns, `block` repeats at a time: the shared host's speed drifts
                # over minutes, and a plan measured in one stretch would carry that drift
                # into its ratio against `single`.
                points = {plan: {"bandwidth_mbit": bw, "plan": plan, "rows": [],
                                 "packets_dropped_by_shaping": {"up": 0, "down": 0}}
                          for plan in plans}
                for start in range(0, args.repeats, args.block):
                    for plan in plans:
                        point = points[plan]
                        if "error" in point:
                            continue
                        n = min(args.block, args.repeats - start)
                        drops0 = [tb.drops(f"dev{i}") for i in (1, 2, 3)]
                        if plan == ORT:
                            rep = _ort_rows(ort, n, args.cap, doc["onnx_rel_err"])
                        else:
                            rep = ask(proc, args.cap * (n + 2 + args.warmup) + 120, cmd="run",
                                      plan=plan, repeats=n, cap_s=args.cap, warmup=args.warmup)
                        for d in ("up", "down"):
                            point["packets_dropped_by_shaping"][d] += sum(
                                tb.drops(f"dev{i}")[d] - d0[d] for i, d0 in zip((1, 2, 3), drops0))
                        point["loadavg"] = os.getloadavg()
                        if rep.get("ok"):
                            point["rows"] += rep["result"]
                        else:
                            point["error"] = rep.get("error")
                for plan in plans:
                    point = points[plan]
                    pred = predicted(args.model, plan, plans[1])
                    point["predicted_s"] = pred and pred["seconds"]
                    point["predicted_stages"] = pred and pred["stages"]
                    if "error" in point:
                        point.pop("rows")
                    else:
                        point["median_s"] = float(np.median([r["latency_s"]
                                                             for r in point["rows"]]))
                        point["median_without_input_s"] = float(np.median(
                            [r["without_input_s"] for r in point["rows"]]))
                    doc["points"].append(point)
                    print(f"{bw:g} Mb/s {plan}: {point.get('median_s', point.get('error'))}",
                          flush=True)
                    _save(doc, args.out)
        finally:
            doc["emulated"] = tb.describe()
            if ort is not None:
                ort.stdin.close()
                ort.wait(timeout=30)
    doc["loadavg_end"], doc["finished"] = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    _save(doc, args.out)
    return 0


def _ort_rows(ort, n: int, cap_s: float, rel_err: float) -> dict:
    """`n` timed onnxruntime runs on the emulated device, as rows like the plans' (its
    logits were checked against decolla.forward when exported)."""
    rep = ort_device.run(ort, n, cap_s * (n + 2) + 60)
    if rep.get("ok"):
        rep["result"] = [{"latency_s": r["latency_s"], "without_input_s": r["latency_s"],
                          "cpu_s": r["cpu_s"], "bytes": 0, "stages": 1, "planned_mbit": None,
                          "top1_ok": True, "rel_err": rel_err, "timeline": []}
                         for r in rep["result"]]
    return rep


def planned_links(rows: list) -> str:
    """The links the requester planned for ('-' for plans that are not auto)."""
    seen = sorted({(r["planned_mbit"], r.get("planned_shared")) for r in rows
                   if r.get("planned_mbit") is not None})
    return ", ".join(f"{v:g} ({'shared' if sh else 'own links'})" for v, sh in seen) or "-"


def _save(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = doc.get("name") or f"plans_testbed_{doc['emulation']}"
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# Plans on the testbed ({Path(doc['model']).name}, 3 emulated Pi-class devices, "
             "fp16 wire)", "",
             f"Emulation {doc.get('emulation_line', doc['emulation'])}; {doc['repeats']} "
             f"repeats per point; started {doc.get('started', '?')}; `{doc.get('command', '')}`.",
             "", *_table(doc)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _table(doc: dict, emulation_column: bool = False) -> list[str]:
    """Markdown rows of one run: every plan against both single-device baselines."""
    base = {(p["bandwidth_mbit"], p["plan"]): p.get("median_s") for p in doc["points"]}
    head = ("| emulation " if emulation_column else "") + (
        "| Mb/s | plan | median ms | without input ms | cost model ms | vs mobile-only "
        "(ours) | vs onnxruntime (1 device) | stages | MB | top-1 ok | packets dropped by "
        "shaping | load avg | planned for (Mb/s, links) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    lead = f"| {doc['emulation']} " if emulation_column else ""
    for p in doc["points"]:
        plan = p["plan"].split(",gmacs")[0]
        if "median_s" not in p:
            lines.append(f"{lead}| {p['bandwidth_mbit']:g} | {plan} | failed: "
                         f"{p.get('error')} |" + " |" * 10)
            continue
        bw = p["bandwidth_mbit"]
        ratios = [f"{base[bw, ref] / p['median_s']:.2f}x" if base.get((bw, ref)) else "-"
                  for ref in ("single", ORT)]
        mb = np.median([r["bytes"] for r in p["rows"]]) / 1e6
        ok = sum(r["top1_ok"] for r in p["rows"])
        drops = p.get("packets_dropped_by_shaping", {})
        pred = p.get("predicted_s")
        lines.append(f"{lead}| {bw:g} | {plan} | {p['median_s'] * 1e3:.0f} | "
                     f"{p['median_without_input_s'] * 1e3:.0f} | "
                     f"{'-' if pred is None else f'{pred * 1e3:.0f}'} | {ratios[0]} | {ratios[1]} | "
                     f"{int(np.median([r['stages'] for r in p['rows']]))} | {mb:.3f} | "
                     f"{ok}/{len(p['rows'])} | {sum(drops.values()) if drops else '-'} | "
                     f"{p['loadavg'][0]:.2f} | {planned_links(p['rows'])} |")
    return lines


def headline(out: Path, names: list[str] | None = None) -> int:
    """plans_testbed_both.md: both emulations' tables, one after the other, from their files
    (plans_testbed_<emulation>.json); with `names`, from those result files (stems, e.g. one
    per emulation and bandwidth) into <first name>_both.md."""
    stems = names or [f"plans_testbed_{e}" for e in EMULATIONS]
    docs = [json.loads((out / f"{n}.json").read_text()) for n in stems
            if (out / f"{n}.json").exists()]
    if not docs or (names and len(docs) < len(names)):
        print(f"missing result files in {out}: {', '.join(stems)}", file=sys.stderr)
        return 2
    lines = ["# Plans on the testbed (MobileNetV2-224, 3 emulated Pi-class devices, fp16 wire)",
             "", "Emulations:"]
    lines += [f"- {d.get('emulation_line', d['emulation'])}; {d['repeats']} repeats per point, "
              f"started {d.get('started', '?')}: `{d.get('command', '')}`" for d in docs]
    lines.append("")
    for i, d in enumerate(docs):
        lines += _table(d, emulation_column=True)[(0 if i == 0 else 2):]
    (out / (f"{names[0]}_both.md" if names else "plans_testbed_both.md")).write_text(
        "\n".join(lines) + "\n")
    return 0


def _median(rows: list, key) -> float:
    return float(np.median([key(r) for r in rows]))


def against_best(out: Path, names: list[str], target: float = 0.95) -> int:
    """<first name>_vs_best.md: per bandwidth of the runs `names`, `single`, both `auto`s
    and onnxruntime, and each `auto` against the better single-device baseline of the same
    run, with onnxruntime credited once with the image already on its device (as measured)
    and once with the image delivered (onnxruntime + `single`'s measured delivery of the
    image to a device in the same run: a sum of two measurements, not one)."""
    lines = ["# `auto` against the best single device (MobileNetV2-224, 3 emulated devices, "
             "fp16 wire)", "", "Runs:"]
    rows = []
    for name in names:
        doc = json.loads((out / f"{name}.json").read_text())
        lines.append(f"- `{name}`: {doc.get('emulation_line', doc['emulation'])}; "
                     f"{doc['repeats']} repeats; started {doc.get('started', '?')}")
        for bw in sorted({p["bandwidth_mbit"] for p in doc["points"]}):
            pts = {p["plan"].split(",gmacs")[0]: p for p in doc["points"]
                   if "median_s" in p and p["bandwidth_mbit"] == bw}
            single, ort = pts.get("single"), pts.get(ORT)
            if single is None or ort is None:
                continue
            delivery = _median(single["rows"], lambda r: r["latency_s"] - r["without_input_s"])
            ort_sent = ort["median_s"] + delivery
            for plan, p in pts.items():
                if not plan.startswith("auto"):
                    continue
                best = min(single["median_s"], ort["median_s"])
                best_sent = min(single["median_s"], ort_sent)
                stages = int(np.median([r["stages"] for r in p["rows"]]))
                pred = p.get("predicted_s")
                rows.append(
                    f"| {bw:g} | {plan} | {stages} | {p['median_s'] * 1e3:.0f} | "
                    f"{'-' if pred is None else f'{pred * 1e3:.0f}'} | "
                    f"{single['median_s'] * 1e3:.0f} | {ort['median_s'] * 1e3:.0f} | "
                    f"{ort_sent * 1e3:.0f} | {single['median_s'] / p['median_s']:.2f}x | "
                    f"{ort['median_s'] / p['median_s']:.2f}x | {ort_sent / p['median_s']:.2f}x | "
                    f"{'met' if best / p['median_s'] >= target else 'missed'} / "
                    f"{'met' if best_sent / p['median_s'] >= target else 'missed'} |")
    head = ("| Mb/s | plan | stages | median ms | cost model ms | mobile-only (ours) ms | "
            "onnxruntime ms (image there) | onnxruntime + image delivery ms | vs mobile-only | "
            "vs onnxruntime | vs onnxruntime + delivery | within 5 % of the better baseline "
            "(image there / delivered) |")
    lines += ["", head, "|---" * (head.count("|") - 1) + "|", *rows]
    (out / f"{names[0]}_vs_best.md").write_text("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plans_testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--leader")
    p.add_argument("--bind")
    p.add_argument("--model", default="mobilenet_v2:seed=0",
                   help="a model spec or file (.onnx: onnxruntime runs that file)")
    p.add_argument("--bandwidths", default="1,10,100,1000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-k", type=float, default=8.0, help="device slowdown vs one host core")
    p.add_argument("--cap", type=float, default=60.0, help="per-request time cap, s")
    p.add_argument("--overhead-ms", type=float, default=1.0,
                   help="the auto planner's per-message cost (device message handling is slowed "
                        "by the CPU quota too)")
    p.add_argument("--device-overhead-ms", type=float, default=None,
                   help="the auto planner's per-chunk device cost (default: the planner's)")
    p.add_argument("--block", type=int, default=4,
                   help="repeats of one plan before the next plan's turn")
    p.add_argument("--cpu-period-us", type=int, default=None,
                   help="CFS period of the device quotas (default 10 ms; 1: the shortest the "
                        "kernel allows for the quota, a smoother slow CPU)")
    p.add_argument("--plans", default="exchange",
                   help="more plans to run at every bandwidth (comma-separated)")
    p.add_argument("--no-spatial", dest="spatial", action="store_false",
                   help="leave out the `spatial` plan (run by default at 100 Mb/s and above)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed inferences before each plan's block (3: one per device)")
    p.add_argument("--min-gain", type=float, default=None,
                   help="also run the told auto with this min_gain (the predicted speed-up a "
                        "split must reach; the planner's default 1.1): what its split would give")
    p.add_argument("--also-told", default="", metavar="OPTS",
                   help="also run the told auto with these plan options (e.g. max_mb=0)")
    p.add_argument("--emulation", choices=EMULATIONS, default="dilation",
                   help="how devices are slowed: time dilation (continuous) or a CFS quota")
    p.add_argument("--no-ort", dest="ort", action="store_false",
                   help="leave out the onnxruntime baseline (it needs torch and onnxruntime)")
    p.add_argument("--headline", nargs="?", const="", default=None, metavar="NAMES",
                   help="only write plans_testbed_both.md from both emulations' result files "
                        "(plans_testbed_<emulation>.json), or <first>_both.md from the result "
                        "files NAMES (comma-separated stems)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None,
                   help="result file stem (default plans_testbed_<emulation>, which --headline "
                        "reads); give one for partial runs so they do not replace it")
    p.add_argument("--against-best", metavar="NAMES", default=None,
                   help="only write <first>_vs_best.md from the result files NAMES "
                        "(comma-separated stems): each auto against the better single device")
    args = p.parse_args(argv)
    if args.headline is not None:
        return headline(args.out, [n for n in args.headline.split(",") if n])
    if args.against_best:
        return against_best(args.out, args.against_best.split(","))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.cpu_period_us:
        from bench.testbed import cgroup
        os.environ[cgroup.PERIOD_ENV] = str(args.cpu_period_us)
    return agent(args) if args.agent else drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
