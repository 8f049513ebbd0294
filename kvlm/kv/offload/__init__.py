"""Tiers that hold blocks evicted from the pool (RAM, disk, Redis) and the `--kv-offload`
spec that names them."""
