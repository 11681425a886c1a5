"""Benchmark protocols shipped with fseft (YAML data files; see :mod:`fseft.benchmark.protocol`)."""
