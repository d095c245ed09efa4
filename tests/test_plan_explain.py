"""`decolla plan --explain` never proposes a plan predicted slower than an alternative it
prints, and says the device speed it assumed."""
from __future__ import annotations

import re

import pytest

from decolla import cli

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"


def _explain(capsys, *args) -> str:
    # cli._plan, not cli.main: main points the process's logging at capsys's stream
    assert cli._plan(cli.build_parser().parse_args(["plan", "--explain", "--model", SPEC,
                                                    *args])) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("mbit", ["1", "10", "100", "1000"])
def test_the_chosen_plan_is_never_slower_than_a_printed_alternative(capsys, mbit, local):
    out = _explain(capsys, "--bandwidth-mbit", mbit, *(["--local"] if local else []))
    total = out[out.index("total:"):].splitlines()[0]
    chosen = float(re.search(r"predicted ([\d.]+) ms", total).group(1))
    alternatives = [float(x) for x in re.findall(r"([\d.]+) ms (?:with|on)", total)]
    assert alternatives and all(chosen <= a + 0.05 for a in alternatives), total
    assert ("on the requester itself" in total) == local


def test_the_device_speed_assumed_is_printed(capsys):
    assert "GMAC/s" in _explain(capsys)
    assert "3 GMAC/s" in _explain(capsys, "--gmacs", "3")
