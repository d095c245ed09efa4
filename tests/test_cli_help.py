"""Every command line option says what it does and its default; plan options list every
plan; `decolla status` keeps its --timeout."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest

from decolla import cli, node
from decolla.helpformat import HelpFormatter
from decolla.plans import PLANS


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {"decolla": cli.build_parser(), "python -m decolla.node": node.build_parser()}
    for action in out["decolla"]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update({f"decolla {k}": v for k, v in action.choices.items()})
    try:
        from decolla.gateway.server import add_arguments
        out["gateway"] = add_arguments(argparse.ArgumentParser(formatter_class=HelpFormatter))
    except ImportError:
        pass
    try:
        from decolla.policy import train
        out["python -m decolla.policy.train"] = train.build_parser()
    except ImportError:       # the train extra (torch) is not installed
        pass
    return out


PARSERS = _parsers()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_with_its_default(name):
    parser = PARSERS[name]
    assert issubclass(parser.formatter_class, HelpFormatter)
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        text = fmt._expand_help(action)
        has_default = not (action.default is None or action.default is False
                           or action.default in ([], argparse.SUPPRESS))
        if has_default:
            assert "default" in text, f"{name} {action.option_strings}: {text!r}"


def test_train_usage_names_the_module():
    pytest.importorskip("torch")
    assert PARSERS["python -m decolla.policy.train"].format_usage().startswith(
        "usage: python -m decolla.policy.train")


@pytest.mark.parametrize("name", ["decolla infer", "decolla plan", "decolla demo",
                                  "python -m decolla.node"])
def test_plan_options_list_every_plan(name):
    (plan,) = [a for a in PARSERS[name]._actions if "--plan" in a.option_strings]
    assert all(p in plan.help for p in PLANS), plan.help


def test_status_keeps_its_timeout():
    from decolla.actors.system import free_port
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "decolla", "status", "--timeout", "3",
                        "--leader", f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0 and "3 s" in r.stderr
    assert took < 3 + 4, f"status --timeout 3 took {took:.1f} s"
