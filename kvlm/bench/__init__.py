"""Benchmarks: measuring functions that return dataclasses, and their reports.

`transformers` and `llama_cpp` are optional and imported only inside their baselines.
"""
