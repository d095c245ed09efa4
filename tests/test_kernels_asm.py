"""The v3 build's packed pointwise K loops (kernels/_pw_packed.pxi, pw3_block) keep their
12 accumulators in registers: no loop that broadcasts a pixel and runs FMAs on it touches
the stack, in gemm_v3 and in fused_v3. A hoisted constant once made gcc spill two
accumulators in fused_v3 only, 16 % slower there."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import decolla.kernels

KDIR = Path(decolla.kernels.__file__).parent
# the functions the block is inlined into
PW_FUNCS = re.compile(r"_pw_block|_pw_panel|_pw_packed|pw_packed_serial|pwconv_packed|inverted_residual")
INSN = re.compile(r"\s+([0-9a-f]+):\s+(.*)")
JUMP = re.compile(r"j\w+\s+([0-9a-f]+)\s")


def k_loops(so: Path) -> list[list[str]]:
    """Bodies of the innermost loops (a conditional backward jump over straight-line code)
    in the pointwise functions that broadcast a float and run ymm FMAs on it."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], check=True,
                         capture_output=True, text=True).stdout
    loops, func, insns = [], "", []
    for line in out.splitlines() + ["<end>:"]:
        if line.endswith(">:"):
            if PW_FUNCS.search(func):
                addr = {a: i for i, (a, _) in enumerate(insns)}
                for i, (a, text) in enumerate(insns):
                    m = JUMP.match(text)
                    if (m and not text.startswith("jmp") and int(m.group(1), 16) in addr
                            and int(m.group(1), 16) < a):
                        body = [t for _, t in insns[addr[int(m.group(1), 16)]:i + 1]]
                        # straight-line body: the back edge is its only jump
                        if (sum(JUMP.match(t) is not None for t in body) == 1
                                and any("vbroadcastss" in t for t in body)
                                and sum(t.startswith("vfmadd") and "ymm" in t
                                        for t in body) >= 2):
                            loops.append(body)
            func, insns = line, []
        elif m := INSN.match(line):
            insns.append((int(m.group(1), 16), m.group(2)))
    return loops


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump")
@pytest.mark.parametrize("module", ["gemm_v3", "fused_v3"])
def test_v3_pointwise_k_loops_do_not_spill(module):
    so = next(KDIR.glob(f"{module}.*.so"), None)
    if so is None:
        pytest.skip(f"no {module} build here")
    loops = k_loops(so)
    # a wide (12 FMA) loop for the 6-pixel block, at least
    assert any(sum(t.startswith("vfmadd") for t in body) == 12 for body in loops), len(loops)
    for body in loops:
        assert not [t for t in body if "%rsp" in t or "%rbp" in t], "\n".join(body)
