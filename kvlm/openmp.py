"""How long torch's idle OpenMP threads spin before they sleep: set before torch loads its
OpenMP runtime (`kvlm/__init__.py` imports this module first; it imports nothing heavy).

torch's Linux wheels use GNU OpenMP (libgomp), whose threads spin 300,000 times after each
parallel region before they sleep: about 7.8 ms on an AMD EPYC Zen 4 (a thread's CPU time
across 50 host gaps of 20 ms after a 2-thread op). Between two decode steps the engine thread
does its host work (outputs, detokenizing, scheduling) and the grammar mask workers compute the
next masks; on a 2-core machine the spinning thread holds the other core for the whole gap, so
all of that shares one core. GOMP_SPINCOUNT=10000 (~0.26 ms) releases it; plain decoding does
not slow (SmolLM2 gguf, 2 threads, 9 runs each alternating: batch 1 236 vs 232 tok/s, 16
streams 750 vs 790 tok/s, default vs 10000).

libgomp reads the environment once, when it loads: a value already in the environment wins,
and a process that imported torch before kvlm keeps libgomp's default (`IDLE_THREADS_SLEEP`
is then False, unless the environment set the wait already).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 10_000
_SET_BY_USER = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
IDLE_THREADS_SLEEP = _SET_BY_USER or "torch" not in sys.modules
os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
