"""Plots (PNG) and a Markdown table from a bench.fig6 result file.

    python -m bench.fig6_report bench/results/fig6_quick_mobilenet_v2.json   # regenerate
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABEL = {"mobile": "mobile-only", "partition": "partition-offloading",
         "hierarchical": "hierarchical", "decolla": "DeColla (layer plan)",
         "auto": "DeColla (auto plan)", "onnxruntime": "onnxruntime (1 device, image there)"}
ORDER = ("mobile", "partition", "hierarchical", "decolla", "auto", "onnxruntime")
STYLE = {"mobile": "s-", "partition": "^-", "hierarchical": "o-", "decolla": "D-", "auto": "*-",
         "onnxruntime": "v--"}
COLOR = {"mobile": "C0", "partition": "C1", "hierarchical": "C2", "decolla": "C3", "auto": "C4",
         "onnxruntime": "C5"}
PANELS = {
    "a": ("a) latency vs bandwidth (30 % CPU usage)", "bandwidth (Mb/s)", "latency_median_s",
          "median latency (s)", True),
    "c": ("c) normalized utilisation variance vs bandwidth", "bandwidth (Mb/s)",
          "norm_variance_median", "normalized variance", True),
    "b": ("b) latency vs CPU usage (20 Mb/s)", "CPU usage of every device", "latency_median_s",
          "median latency (s)", False),
    "d": ("d) normalized utilisation variance vs concurrent requests (20 Mb/s)",
          "concurrent requests", "norm_variance_median", "normalized variance", False),
    "e": ("e) one collaborator's CPU usage rises (20 Mb/s)", "CPU usage of dev2",
          "latency_median_s", "median latency (s)", False),
    "f": ("f) collaborators disconnected mid-inference (20 Mb/s)", "devices disconnected",
          "latency_median_s", "median latency (s)", False),
}


def series(doc: dict, sweep: str, key: str) -> dict:
    """method -> [(x, value or None, capped)] for one sweep ('c' reads sweep 'a')."""
    out: dict = {}
    for p in doc["sweeps"].get("a" if sweep == "c" else sweep, []):
        s = p["summary"]
        out.setdefault(p["method"], []).append((p["x"], s.get(key), bool(s.get("capped"))))
    return {m: sorted(v) for m, v in out.items()}


def plot(doc: dict, prefix: Path) -> list[Path]:
    """One PNG per panel present in `doc`; (e) also shows waiting latency."""
    paths = []
    model = doc.get("model", "")
    for panel, (title, xlabel, key, ylabel, logx) in PANELS.items():
        data = series(doc, panel, key)
        if not data:
            continue
        ncols = 2 if panel == "e" else 1
        fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), squeeze=False)
        ax = axes[0][0]
        for m in ORDER:
            if m not in data:
                continue
            pts = [(x, y) for x, y, _ in data[m] if y is not None]
            if pts:
                ax.plot(*zip(*pts), STYLE[m], color=COLOR[m], label=LABEL[m])
            capped = [x for x, y, c in data[m] if y is None and c]
            if capped:
                top = max([y for _, y, _ in sum(data.values(), []) if y is not None] or [1])
                ax.plot(capped, [top] * len(capped), "x", color=COLOR[m], label=f"{LABEL[m]}: capped ({doc['config']['cap_s']:.0f} s)")
        if logx:
            ax.set_xscale("log")
        if key == "latency_median_s":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        if panel == "e":
            w = series(doc, "e", "waiting_median_s")
            ax2 = axes[0][1]
            for m, pts in w.items():
                pts = [(x, y) for x, y, _ in pts if y is not None]
                if pts:
                    ax2.plot(*zip(*pts), STYLE[m], color=COLOR[m], label=LABEL[m])
            ax2.set_xlabel(xlabel)
            ax2.set_ylabel("median waiting latency per device (s)")
            ax2.set_title("e) waiting latency (device idle, from traces)", fontsize=10)
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=8)
        fig.suptitle(f"{model} on 3 emulated devices ({doc.get('mode')}, "
                     f"{doc.get('emulation', 'quota')} emulation)", fontsize=9)
        fig.tight_layout()
        path = Path(f"{prefix}_{panel}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(v, unit="s"):
    if v is None:
        return "–"
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return f"{v:.3f}"


def table(doc: dict) -> str:
    """Markdown: per sweep, one row per x, one column per method."""
    lines = [f"# Fig. 6 on the testbed — {doc.get('model')} ({doc.get('mode')} mode, "
             f"{doc.get('emulation', 'quota')} emulation)", ""]
    cal = doc.get("calibration") or {}
    if doc.get("emulation_line"):
        lines.append(f"Devices: {doc['emulation_line']}. Edge quota {doc.get('edge_quota_cores')} "
                     f"cores.")
    elif cal:
        lines.append(f"Devices: quota {cal.get('quota')} cores -> whole-model forward "
                     f"{cal.get('achieved_slowdown', 0):.1f}x slower than one host core "
                     f"(target {cal.get('k')}x). Edge quota {doc.get('edge_quota_cores')} cores.")
    speeds = [d.get("speed_gmacs") for d in (doc.get("status") or {}).get("devices", [])]
    if speeds:
        lines.append(f"Devices' start-up speed check as `Client.status()` reports it: "
                     f"{', '.join(f'{v:g}' for v in speeds)} GMAC/s.")
    lines.append("Cells: median latency s (ok/n; `cap` = hit the time cap; `!` = a wrong output).")
    lines.append("")
    for panel, (title, xlabel, key, ylabel, _) in PANELS.items():
        data = series(doc, panel, key)
        if not data:
            continue
        pts = doc["sweeps"]["a" if panel == "c" else panel]
        methods = [m for m in ORDER if m in data]
        xs = sorted({p["x"] for p in pts})
        lines += [f"## {title}", "", f"| {xlabel} | " + " | ".join(LABEL[m] for m in methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        for x in xs:
            cells = []
            for m in methods:
                p = next((q for q in pts if q["x"] == x and q["method"] == m), None)
                if p is None:
                    cells.append("")
                    continue
                s = p["summary"]
                v = s.get(key)
                cell = _fmt(v, "s" if "latency" in key else "")
                if "latency" in key:
                    cell += f" ({s['ok']}/{s['n']})"
                if panel == "e":
                    cell += f", wait {_fmt(s.get('waiting_median_s'))}"
                if s.get("capped"):
                    cell += " cap"
                if s.get("correct") is False:
                    cell += " !"
                cells.append(cell)
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fig6_report")
    p.add_argument("json", type=Path)
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    prefix = args.json.with_suffix("")
    paths = plot(doc, prefix)
    args.json.with_suffix(".md").write_text(table(doc))
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
