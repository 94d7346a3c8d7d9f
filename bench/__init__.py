"""Benchmarks of gp-lightning (scripts run as ``python bench/NAME.py``); ``bench.common`` is what they share."""
