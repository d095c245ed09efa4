"""bench.fig6's command line and report without the testbed: bad options are refused with
one line, and the onnxruntime baseline and the emulation appear in the table and plots."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import fig6, fig6_report  # noqa: E402


@pytest.mark.parametrize("argv, says", [
    (["--emulation", "dilation", "--only", "b"], "(b) and (e)"),
    (["--emulation", "dilation"], "(b) and (e)"),            # all sweeps include (b)
    (["--methods", "mobile,tflite"], "unknown methods ['tflite']"),
])
def test_bad_options_are_refused_before_any_testbed_starts(argv, says, capsys, tmp_path):
    assert fig6.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_sweeps_of_only_pairs_c_with_a():
    assert fig6.sweeps_of("") == "abdef"
    assert fig6.sweeps_of("a") == "a"
    assert fig6.sweeps_of("af") == "af"


def _point(method: str, x: float, lat: float) -> dict:
    rows = [{"ok": True, "correct": True, "latency_s": lat, "latency_e2e_s": lat,
             "bytes": 0, "waiting_s": {}} for _ in range(3)]
    point = {"inferences": rows, "rounds": [{"norm_variance": 1.0}] * 3}
    return {"x": x, "method": method, **point, "summary": fig6.summarize(point)}


def test_the_report_shows_onnxruntime_and_the_emulation(tmp_path):
    doc = {"model": "m", "mode": "quick", "config": {"cap_s": 60}, "emulation": "dilation",
           "emulation_line": "dilation: time dilation f=6.000 (DECOLLA_DILATE)",
           "sweeps": {"a": [_point(m, bw, lat) for bw in (1, 1000)
                            for m, lat in (("auto", 0.05), (fig6.ORT, 0.036))]}}
    md = fig6_report.table(doc)
    assert "dilation emulation" in md and "f=6.000" in md
    header = next(line for line in md.splitlines() if line.startswith("| bandwidth"))
    assert fig6_report.LABEL[fig6.ORT] in header and fig6_report.LABEL["auto"] in header
    assert "| 1000 | 0.050 (3/3) | 0.036 (3/3) |" in md
    pngs = fig6_report.plot(doc, tmp_path / "f")
    assert [p.name for p in pngs] == ["f_a.png", "f_c.png"]
