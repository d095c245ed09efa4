"""Compiled Cython kernels (built from kernels/*.pyx)."""
