"""Benchmarks that print this project against its peer in the same run.

Run from the repository root as modules, e.g. `python -m bench.train_step`.
"""
