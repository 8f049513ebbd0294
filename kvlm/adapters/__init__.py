"""Adapters that change what a request attends to without changing the model's weights."""

from kvlm.adapters.prefix_tuning import AdapterError, PrefixTuningAdapter, load_prefix_adapter

__all__ = ["AdapterError", "PrefixTuningAdapter", "load_prefix_adapter"]
