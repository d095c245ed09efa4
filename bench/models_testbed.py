"""The testbed `auto` speed-up of each imported network over one device (issue 18).

    sudo .venv/bin/python -m bench.models_testbed run --models squeezenet1_1 [--repeats 24]
        [--bandwidths 100,1000] [--also-told max_mb=0,min_gain=0] [--suffix _again]
    python -m bench.models_testbed report      # models_testbed.{md,json} from the run files

`run` exports each zoo network (bench.zoo: seeded random weights, 224 px) to ONNX and runs
bench.plans_testbed on that file: 3 emulated Pi-class devices slowed by time dilation
calibrated on that network's whole forward (k = 8x slower than a host core), tc tbf links,
plans `single` (mobile-only, our runtime), `auto` told the links and speed, plain `auto`
(links measured by the requester), with `--also-told` a second told `auto` with more
options (`max_mb=0,min_gain=0`: the cost model's cheapest plan, no safety margins), and
onnxruntime on the same file on one emulated device.
One result file per network, models_testbed_<network><suffix>.{json,md}, with every request's
timeline and its error against the single-process forward. `report` reads them: per network
and bandwidth the measured latencies and speed-ups, bytes on the wire, the plan (chunks per
stage as run; the cost model's split of the told plan), the cost model's predicted speed-up
beside the measured one, the largest error against the single-process forward, each
runtime's slowdown on the device; the second told `auto`s in a table of their own.
`python -m bench.models` adds the same table to its report when models_testbed.json exists.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bench import plans_testbed, zoo

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "models_testbed_"
SINGLE, PLAIN, ORT, VARIANT = "single", "auto", plans_testbed.ORT, "told+"
# the told auto of plans_testbed: the links and the calibrated speed, nothing else
TOLD_KEYS = ("bandwidth_mbit", "shared_link", "gmacs", "overhead_ms", "device_overhead_ms")
TOLD_RE = r"auto:bandwidth_mbit=[^,]+,shared_link=0,gmacs=[^,]+,overhead_ms=[^,]+" \
          r"(,device_overhead_ms=[^,]+)?"


def run(models: list[str], bandwidths: str, repeats: int, out: Path, also_told: str = "",
        suffix: str = "", size: int = 224) -> int:
    """bench.plans_testbed on each network's ONNX file in turn (needs root and torch);
    `also_told`: options of a second told `auto` to run beside the first (e.g. max_mb=0)."""
    # under /tmp: the testbed's namespaces (root, the same mounts) read it by this path
    with tempfile.TemporaryDirectory(prefix="dcmt-", dir="/tmp") as work:
        for name in models:
            path = Path(work) / f"{name}.onnx"
            zoo.export(name, str(path), size)
            rc = plans_testbed.main(["--model", str(path), "--emulation", "dilation",
                                     "--bandwidths", bandwidths, "--repeats", str(repeats),
                                     "--plans", "", "--no-spatial", "--out", str(out),
                                     "--name", PREFIX + name + suffix]
                                    + (["--also-told", also_told] if also_told else []))
            if rc:
                return rc
    return 0


def chunks_per_stage(rows: list[dict]) -> str:
    """The plan as run: chunks merged per stage ('3+3'), the most frequent over the requests
    (their timelines' won attempts)."""
    shapes = Counter()
    for r in rows:
        won: dict = {}
        for stage, chunk, _dev, status, *_ in r["timeline"]:
            if status == "won":
                won.setdefault(stage, set()).add(chunk)
        shapes["+".join(str(len(won[s])) for s in sorted(won)) or "-"] += 1
    return shapes.most_common(1)[0][0] if shapes else "-"


def summarize(doc: dict) -> list[dict]:
    """One row per bandwidth of a plans_testbed result file: medians of single, both autos
    and onnxruntime, speed-ups, bytes, plans, predictions and errors."""
    network = Path(doc["model"]).stem
    out = []
    for bw in sorted({p["bandwidth_mbit"] for p in doc["points"]}):
        pts = {_role(p["plan"]): p for p in doc["points"] if p["bandwidth_mbit"] == bw}
        row = {"model": network, "bandwidth_mbit": bw, "dilation": doc["calibration"]["dilation"],
               "errors": {k: p["error"] for k, p in pts.items() if "error" in p}}
        ms = {k: p["median_s"] * 1e3 for k, p in pts.items() if "median_s" in p}
        row["ms"] = ms
        for k in ("told", PLAIN, VARIANT):
            p = pts.get(k)
            if p is None or k not in ms:
                continue
            row[k] = {"options": _options(p["plan"]),
                      "vs_single": ms[SINGLE] / ms[k] if SINGLE in ms else None,
                      "vs_ort": ms[ORT] / ms[k] if ORT in ms else None,
                      "mb": float(np.median([r["bytes"] for r in p["rows"]])) / 1e6,
                      "chunks": chunks_per_stage(p["rows"]),
                      "planned_mbit": plans_testbed.planned_links(p["rows"])}
        single = pts.get(SINGLE, {})
        for k in ("told", VARIANT):
            p = pts.get(k, {})
            if p.get("predicted_s") and single.get("predicted_s"):
                row.setdefault(k, {})["predicted"] = {
                    "told_ms": p["predicted_s"] * 1e3, "single_ms": single["predicted_s"] * 1e3,
                    "speedup": single["predicted_s"] / p["predicted_s"],
                    "stages": p.get("predicted_stages") or []}
        row["predicted"] = row.get("told", {}).pop("predicted", None)
        dist = [r for k in (SINGLE, "told", PLAIN, VARIANT) for r in pts.get(k, {}).get("rows", [])]
        row["max_rel_err"] = max((r["rel_err"] for r in dist), default=None)
        row["top1_ok"] = f"{sum(r['top1_ok'] for r in dist)}/{len(dist)}"
        row["ort_rel_err"] = doc.get("onnx_rel_err")
        # how much slower than a host core each runtime ran on the emulated device: the
        # dilation is calibrated on our forward (k), onnxruntime runs under the same factor
        host_ort = doc.get("onnx_host_ms")
        row["slowdown"] = {"ours": doc["calibration"].get("achieved_slowdown"),
                           "ort": ms[ORT] / host_ort if host_ort and ORT in ms else None}
        out.append(row)
    return out


def _role(plan: str) -> str:
    """A plans_testbed plan's part here: single, the told auto ('told': its options are the
    link and speed only), another told auto (VARIANT), plain auto or onnxruntime."""
    if not plan.startswith("auto:"):
        return plan
    return "told" if re.fullmatch(TOLD_RE, plan) else VARIANT


def _options(plan: str) -> str:
    """A told auto's own options (beyond the link and the calibrated speed)."""
    rest = plan.partition(":")[2].split(",")
    return ",".join(o for o in rest if o.split("=")[0] not in TOLD_KEYS)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ms(row: dict, key: str) -> str:
    v = row["ms"].get(key)
    return "failed" if key in row["errors"] else "-" if v is None else f"{v:.0f}"


def table(rows: list[dict]) -> list[str]:
    """Markdown: latencies and speed-ups, then plans, bytes, predictions and errors."""
    head = ("| model | Mb/s | mobile-only ms | onnxruntime ms | auto told ms | vs mobile-only | "
            "vs onnxruntime | auto (plain) ms | vs mobile-only | vs onnxruntime |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        t, a = r.get("told", {}), r.get(PLAIN, {})
        lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {_ms(r, SINGLE)} | "
                     f"{_ms(r, ORT)} | {_ms(r, 'told')} | {_x(t.get('vs_single'))} | "
                     f"{_x(t.get('vs_ort'))} | {_ms(r, PLAIN)} | {_x(a.get('vs_single'))} | "
                     f"{_x(a.get('vs_ort'))} |")
    head = ("| model | Mb/s | chunks per stage (told / plain) | MB on the wire (told / plain) | "
            "cost model's told plan | predicted speed-up | measured (told) | prediction error | "
            "predicted / measured auto ms | predicted / measured mobile-only ms | "
            "max rel err vs forward (top-1 ok) | device slowdown: ours / onnxruntime |")
    lines += ["", head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        t, a, pr = r.get("told", {}), r.get(PLAIN, {}), r.get("predicted")
        measured = t.get("vs_single")
        err = (f"{(pr['speedup'] / measured - 1) * 100:+.0f} %"
               if pr and measured else "-")
        pred = (f"{pr['told_ms']:.0f} / {_ms(r, 'told')} | {pr['single_ms']:.0f} / "
                f"{_ms(r, SINGLE)}" if pr else "- | -")
        rel = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        slow = r.get("slowdown", {})
        lines.append(
            f"| {r['model']} | {r['bandwidth_mbit']:g} | {t.get('chunks', '-')} / "
            f"{a.get('chunks', '-')} | {t.get('mb', 0):.3f} / {a.get('mb', 0):.3f} | "
            f"{'; '.join(pr['stages']) if pr else '-'} | {_x(pr and pr['speedup'])} | "
            f"{_x(measured)} | {err} | {pred} | {rel} ({r['top1_ok']}) | "
            f"{_x(slow.get('ours'))} / {_x(slow.get('ort'))} |")
    return lines


def variant_table(rows: list[dict]) -> list[str]:
    """Markdown: each run's second told `auto` (its own options) against that run's
    baselines, the cost model's prediction beside it; [] when no run had one."""
    rows = [r for r in rows if VARIANT in r]
    if not rows:
        return []
    head = ("| model | Mb/s | run | told auto with | ms | vs mobile-only | vs onnxruntime | "
            "chunks per stage | MB | cost model's plan | predicted speed-up |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        v = r[VARIANT]
        pr = v.get("predicted")
        lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {r['run']} | "
                     f"{v.get('options', '-')} | {_ms(r, VARIANT)} | {_x(v.get('vs_single'))} | "
                     f"{_x(v.get('vs_ort'))} | {v.get('chunks', '-')} | {v.get('mb', 0):.3f} | "
                     f"{'; '.join(pr['stages']) if pr else '-'} | {_x(pr and pr['speedup'])} |")
    return lines


def _files(out: Path) -> list[Path]:
    """Every network's result files in `out` (the main run's first), in bench.zoo's order."""
    return [f for name in zoo.MODELS for f in sorted(out.glob(f"{PREFIX}{name}*.json"),
                                                    key=lambda f: (len(f.name), f.name))
            if f.stem == PREFIX + name or f.stem.startswith(f"{PREFIX}{name}_")]


def load(out: Path) -> tuple[list[dict], list[str]]:
    """The summary rows of every result file in `out` (each with its run's name), and one
    note per run: emulation, repeats, when, the command."""
    rows, notes = [], []
    for path in _files(out):
        d = json.loads(path.read_text())
        rows += [{**r, "run": path.stem} for r in summarize(d)]
        notes.append(f"- `{path.stem}`: {d.get('emulation_line', d['emulation'])}; "
                     f"{d['repeats']} repeats per plan; {d.get('started', '?')} – "
                     f"{d.get('finished', '?')}; `{d.get('command', '')}`")
    return rows, notes


def _document(rows: list[dict], notes: list[str]) -> list[str]:
    main = [r for r in rows if r["run"] == PREFIX + r["model"]]
    more = variant_table(rows)
    return [*notes, "", *table(main)] + (["", *more] if more else [])


def section(out: Path) -> list[str]:
    """bench.models' report section from models_testbed.json ([] when it was never run)."""
    path = out / "models_testbed.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return ["", "## `auto` on the testbed, measured (python -m bench.models_testbed)", "",
            *_document(doc["rows"], doc["notes"])]


def report(out: Path) -> int:
    """models_testbed.{json,md} from the result files in `out`."""
    rows, notes = load(out)
    if not rows:
        print(f"no {PREFIX}<network>.json in {out}", file=sys.stderr)
        return 2
    (out / "models_testbed.json").write_text(json.dumps({"notes": notes, "rows": rows},
                                                        indent=1, default=str))
    lines = ["# `auto` per imported network on the testbed (3 emulated Pi-class devices, "
             "fp16 wire)", "", *_document(rows, notes)]
    (out / "models_testbed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models_testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "report"))
    p.add_argument("--models", default=",".join(zoo.MODELS))
    p.add_argument("--bandwidths", default="100,1000")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--also-told", default="", metavar="OPTS",
                   help="also run the told auto with these options (e.g. max_mb=0,min_gain=0)")
    p.add_argument("--suffix", default="",
                   help="appended to the result files' names (models_testbed_<network><suffix>)")
    args = p.parse_args(argv)
    if args.what == "report":
        return report(args.out)
    unknown = [m for m in args.models.split(",") if m not in zoo.MODELS]
    if unknown:
        p.error(f"unknown network(s) {unknown}; choose from {', '.join(zoo.MODELS)}")
    return run(args.models.split(","), args.bandwidths, args.repeats, args.out, args.also_told,
               args.suffix)


if __name__ == "__main__":
    raise SystemExit(main())
