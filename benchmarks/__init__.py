"""Benchmarks and experiments: ``make accuracy``, ``make bench``, ``make ablation`` and the
studies behind the README's numbers. Not part of the engine package (nor of the wheel or the
plugin zip); run from the repository root, e.g. ``python -m benchmarks.accuracy``.
"""
