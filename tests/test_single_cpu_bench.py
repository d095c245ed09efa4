"""bench.single_cpu on a real loopback cluster: it finds the workers' threads and reports them."""
import re

from bench import single_cpu


def test_reports_reader_and_compute_threads(capsys):
    assert single_cpu.main(["--requests", "6"]) == 0
    out = capsys.readouterr().out
    compute = float(re.search(r"compute thread ([\d.]+) \(traced compute ([\d.]+)\)", out).group(1))
    traced = float(re.search(r"traced compute ([\d.]+)", out).group(1))
    reader = float(re.search(r"reader thread +([\d.]+)", out).group(1))
    assert traced > 0 and compute > 0.5 * traced     # the compute thread is the busiest one
    assert 0 < reader < compute
    assert "beyond compute" in out
