"""Benchmark and report scripts, each runnable as `python -m experiments.NAME` from the repository root.

They are a package (not loose scripts) so the tests can import their pure parts — the FLOP formula, the parameter
accounting, the timing summary — and check them without running a real benchmark.
"""
