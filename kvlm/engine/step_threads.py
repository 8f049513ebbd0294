"""How many CPU threads a server's engine step uses, by the number of sequences in flight.

In `kvlm serve` the event loop that streams every token (HTTP, JSON, server-sent events) shares
the cores with the engine's OpenMP team. With every core in the team, the loop preempts one
OpenMP thread mid-step and the others wait for it at the next barrier. Measured with
`kvlm bench serve` (SmolLM2 gguf weights, fused decode, AMD EPYC Zen 4, 2 cores; the client's
threads share the cores too), aggregate tok/s with 2 threads vs 1: 1 stream 71 vs 100, 4
streams 192 vs 415, 16 streams 416-468 vs 488-505, 32 streams 432 vs 476, 64 streams 639-674
vs 515. Batches of up to `SMALL_BATCH` sequences therefore leave one core to the loop; larger
ones have enough work per step that every configured thread computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SMALL_BATCH = 32  # up to this many sequences: one core stays free for the event loop


@dataclass(frozen=True)
class StepThreads:
    threads: int  # the configured count (--threads, else torch's default: one per core)
    small_batch: int = SMALL_BATCH

    def for_batch(self, num_seqs: int) -> int:
        if self.threads > 1 and num_seqs <= self.small_batch:
            return self.threads - 1
        return self.threads

    def apply(self, num_seqs: int) -> None:
        """Set torch's thread count for a step over `num_seqs` sequences (when it changes)."""
        threads = self.for_batch(num_seqs)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
