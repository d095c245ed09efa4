"""Compile the NEON kernels (kernels/pw_neon.h, kernels/dw_neon.h) to aarch64 assembly
with the NEON build's flags and count, in every innermost loop that does fused
multiply-adds, its fmla, its loads and its stack accesses (spilled registers).

Exits 1 when such a loop touches the stack. Runs on aarch64 with gcc, or on x86-64 with
a cross compiler: python tools/neon_asm_check.py [--cc aarch64-linux-gnu-gcc] [-v].
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")
# The NEON variant's flags in setup.py (less OpenMP, which these headers do not use).
FLAGS = ["-O3", "-fno-math-errno", "-march=armv8-a", "-mtune=cortex-a72", "-DDECOLLA_NEON=1"]
# One non-inline caller per kernel, so each is compiled as the .pyx modules compile it.
DRIVER = """
#include "pw_neon.h"
#include "dw_neon.h"
void check_pw(const float *a, ptrdiff_t M, ptrdiff_t K, const float *w, const float *b,
              float *o, ptrdiff_t ldo, const float *r, ptrdiff_t rs, ptrdiff_t nt, int relu6) {
    pwn_panel(a, M, K, w, b, o, ldo, r, rs, nt, relu6);
}
void check_dw(float *o, ptrdiff_t on, const float *r0, const float *r1, const float *r2,
              ptrdiff_t s0, ptrdiff_t s1, ptrdiff_t s2, ptrdiff_t cx, const float *w,
              ptrdiff_t wc, const float *b, ptrdiff_t n, ptrdiff_t npix, int relu6) {
    dwn_run(o, on, r0, r1, r2, s0, s1, s2, cx, w, wc, b, n, npix, relu6);
}
"""
_LABEL = re.compile(r"^(\.L\w+):")
_COND = "eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le"
_BRANCH = re.compile(rf"^\s+(?:b(?:\.?(?:{_COND}))?|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*(\.L\w+)\s*$")
_FUNC = re.compile(r"^(\w+):")


def assemble(cc: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "neon_check.c"), os.path.join(tmp, "neon_check.s")
        with open(src, "w") as fh:
            fh.write(DRIVER)
        subprocess.run([cc, *FLAGS, "-I", KERNELS, "-S", src, "-o", out], check=True)
        with open(out) as fh:
            return fh.read().splitlines()


def innermost_loops(lines: list[str]) -> list[tuple[str, int, int]]:
    """(function, first line, last line) of every loop (a backward branch to a label)
    that contains no other loop."""
    labels, loops, func = {}, [], "?"
    for i, line in enumerate(lines):
        if m := _FUNC.match(line):
            func = m.group(1)
        if m := _LABEL.match(line):
            labels[m.group(1)] = i
        elif (m := _BRANCH.match(line)) and m.group(1) in labels:
            loops.append((func, labels[m.group(1)], i))
    return [lp for lp in loops
            if not any(o is not lp and lp[1] <= o[1] and o[2] <= lp[2] and o[1:] != lp[1:]
                       for o in loops)]


def count(body: list[str]) -> dict[str, int]:
    ins = [ln.split()[0] for ln in body if ln.startswith("\t") and not ln.lstrip().startswith(".")]
    return {"instructions": len(ins),
            "fmla": sum(i == "fmla" for i in ins),
            "loads": sum(i.startswith(("ldr", "ldp", "ld1")) for i in ins),
            "stack": sum("[sp" in ln for ln in body)}


def main(argv=None) -> int:
    native = platform.machine().lower() in ("aarch64", "arm64")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", default="gcc" if native else "aarch64-linux-gnu-gcc")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every loop")
    args = ap.parse_args(argv)
    lines = assemble(args.cc)
    bad, seen = 0, {}
    for func, lo, hi in innermost_loops(lines):
        c = count(lines[lo:hi + 1])
        if not c["fmla"]:
            continue
        key = (func, c["fmla"], c["loads"], c["stack"])
        seen[key] = seen.get(key, 0) + 1
        bad += c["stack"] > 0
        if args.verbose:
            print(f"{func} lines {lo}-{hi}: {c}")
    for (func, fmla, loads, stack), n in sorted(seen.items()):
        print(f"{func}: {n} inner loop(s) with {fmla} fmla, {loads} loads, "
              f"{stack} stack accesses")
    print(f"{'FAIL' if bad else 'ok'}: {bad} inner loop(s) with fmla touch the stack")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
