"""Benchmarks and the emulated-device testbed (not part of the installed package)."""
