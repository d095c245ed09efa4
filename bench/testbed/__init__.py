"""Emulated-device testbed: network namespaces, tc shaping and cgroup CPU quotas on one Linux machine.

Entry points: `Testbed` (context manager, see core.py), `cleanup(prefix)` for leftovers,
`check_environment()` (None when usable here), and the CLI `python -m bench.testbed`.
"""

from .calibrate import Calibration
from .janitor import cleanup, is_empty, leftovers
from .core import (EmulationDoesNotFit, Host, NotRootError, Testbed, TestbedError, UnsupportedEmulation,
                   check_environment, machine_info)

__all__ = ["Calibration", "EmulationDoesNotFit", "Host", "NotRootError", "Testbed", "TestbedError",
           "UnsupportedEmulation", "check_environment", "cleanup", "is_empty", "leftovers", "machine_info"]
