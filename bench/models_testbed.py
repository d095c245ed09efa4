"""The testbed `auto` speed-up of each imported network over one device (issue 18).

    sudo .venv/bin/python -m bench.models_testbed run --models squeezenet1_1 [--bandwidths 100,1000]
        [--repeats 12]
    python -m bench.models_testbed report      # models_testbed.{md,json} from the run files

`run` exports each zoo network (bench.zoo: seeded random weights, 224 px) to ONNX and runs
bench.plans_testbed on that file: 3 emulated Pi-class devices slowed by time dilation
calibrated on that network's whole forward (k = 8x slower than a host core), tc tbf links,
plans `single` (mobile-only, our runtime), `auto` told the links and speed, plain `auto`
(links measured by the requester) and onnxruntime on the same file on one emulated device.
One result file per network, models_testbed_<network>.{json,md}, with every request's
timeline and its error against the single-process forward. `report` reads them: per network
and bandwidth the measured latencies and speed-ups, bytes on the wire, the plan (chunks per
stage as run; the cost model's split of the told plan), the cost model's predicted speed-up
beside the measured one, and the largest error against the single-process forward.
`python -m bench.models` adds the same table to its report when models_testbed.json exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench import plans_testbed, zoo

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "models_testbed_"
SINGLE, PLAIN, ORT = "single", "auto", plans_testbed.ORT


def run(models: list[str], bandwidths: str, repeats: int, out: Path, size: int = 224) -> int:
    """bench.plans_testbed on each network's ONNX file in turn (needs root and torch)."""
    work = Path("/tmp") / f"dcmt-{os.getpid()}"   # readable from the testbed's namespaces
    work.mkdir(exist_ok=True)
    for name in models:
        path = work / f"{name}.onnx"
        zoo.export(name, str(path), size)
        rc = plans_testbed.main(["--model", str(path), "--emulation", "dilation",
                                 "--bandwidths", bandwidths, "--repeats", str(repeats),
                                 "--plans", "", "--no-spatial", "--out", str(out),
                                 "--name", PREFIX + name])
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
        pts = {}
        for p in doc["points"]:
            if p["bandwidth_mbit"] == bw:
                is_told = p["plan"].startswith("auto:") and "min_gain" not in p["plan"]
                key = "told" if is_told else p["plan"]
                pts[key] = p
        row = {"model": network, "bandwidth_mbit": bw, "dilation": doc["calibration"]["dilation"],
               "errors": {k: p["error"] for k, p in pts.items() if "error" in p}}
        ms = {k: p["median_s"] * 1e3 for k, p in pts.items() if "median_s" in p}
        row["ms"] = ms
        for k in ("told", PLAIN):
            p = pts.get(k)
            if p is None or k not in ms:
                continue
            row[k] = {"vs_single": ms[SINGLE] / ms[k] if SINGLE in ms else None,
                      "vs_ort": ms[ORT] / ms[k] if ORT in ms else None,
                      "mb": float(np.median([r["bytes"] for r in p["rows"]])) / 1e6,
                      "chunks": chunks_per_stage(p["rows"]),
                      "planned_mbit": plans_testbed.planned_links(p["rows"])}
        told, single = pts.get("told", {}), pts.get(SINGLE, {})
        if told.get("predicted_s") and single.get("predicted_s"):
            row["predicted"] = {"told_ms": told["predicted_s"] * 1e3,
                                "single_ms": single["predicted_s"] * 1e3,
                                "speedup": single["predicted_s"] / told["predicted_s"],
                                "stages": told.get("predicted_stages") or []}
        dist = [r for k in (SINGLE, "told", PLAIN) for r in pts.get(k, {}).get("rows", [])]
        row["max_rel_err"] = max((r["rel_err"] for r in dist), default=None)
        row["top1_ok"] = f"{sum(r['top1_ok'] for r in dist)}/{len(dist)}"
        row["ort_rel_err"] = doc.get("onnx_rel_err")
        out.append(row)
    return out


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
            "max rel err vs forward (top-1 ok) |")
    lines += ["", head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        t, a, pr = r.get("told", {}), r.get(PLAIN, {}), r.get("predicted")
        measured = t.get("vs_single")
        err = (f"{(pr['speedup'] / measured - 1) * 100:+.0f} %"
               if pr and measured else "-")
        pred = (f"{pr['told_ms']:.0f} / {_ms(r, 'told')} | {pr['single_ms']:.0f} / "
                f"{_ms(r, SINGLE)}" if pr else "- | -")
        rel = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(
            f"| {r['model']} | {r['bandwidth_mbit']:g} | {t.get('chunks', '-')} / "
            f"{a.get('chunks', '-')} | {t.get('mb', 0):.3f} / {a.get('mb', 0):.3f} | "
            f"{'; '.join(pr['stages']) if pr else '-'} | {_x(pr and pr['speedup'])} | "
            f"{_x(measured)} | {err} | {pred} | {rel} ({r['top1_ok']}) |")
    return lines


def load(out: Path) -> list[dict]:
    """The summary rows of every network's result file in `out`, in bench.zoo's order."""
    rows = []
    for name in zoo.MODELS:
        path = out / f"{PREFIX}{name}.json"
        if path.exists():
            rows += summarize(json.loads(path.read_text()))
    return rows


def section(out: Path) -> list[str]:
    """bench.models' report section from models_testbed.json ([] when it was never run)."""
    path = out / "models_testbed.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return ["", "## `auto` on the testbed, measured (python -m bench.models_testbed)", "",
            *doc["notes"], "", *table(doc["rows"])]


def report(out: Path) -> int:
    rows = load(out)
    if not rows:
        print(f"no {PREFIX}<network>.json in {out}", file=sys.stderr)
        return 2
    notes = []
    for name in zoo.MODELS:
        path = out / f"{PREFIX}{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            notes.append(f"- {name}: {d.get('emulation_line', d['emulation'])}; {d['repeats']} "
                         f"repeats per plan; {d.get('started', '?')} – {d.get('finished', '?')}; "
                         f"`{d.get('command', '')}`")
    (out / "models_testbed.json").write_text(json.dumps({"notes": notes, "rows": rows},
                                                        indent=1, default=str))
    lines = ["# `auto` per imported network on the testbed (3 emulated Pi-class devices, "
             "fp16 wire)", "", *notes, "", *table(rows)]
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
    args = p.parse_args(argv)
    if args.what == "report":
        return report(args.out)
    unknown = [m for m in args.models.split(",") if m not in zoo.MODELS]
    if unknown:
        p.error(f"unknown network(s) {unknown}; choose from {', '.join(zoo.MODELS)}")
    return run(args.models.split(","), args.bandwidths, args.repeats, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
