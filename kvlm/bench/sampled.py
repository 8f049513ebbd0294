"""The no-cache baseline past its cap: every `stride`-th step timed, the steps between
interpolated.

Without a cache, the step that produces generated token i is one forward pass over the whole
sequence so far (`prompt_tokens + i` tokens), whatever those tokens are; that is exactly what a
fresh `prompt_tokens + i`-token prompt generating one token costs. So the step at any position
can be timed on its own, without running every step before it: this module times one step
every `stride` positions past the fully timed run, and extends each real run by linear
interpolation between the timed steps. Lengths read from an extended run are marked as such.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvlm.bench.backends import Backend, RunTiming

# `prompts_of(num_tokens)`: the batch's prompts, each exactly `num_tokens` long.
PromptsOf = Callable[[int], list[list[int]]]


def sample_steps(
    backend: Backend,
    prompts_of: PromptsOf,
    prompt_tokens: int,
    first: int,
    last: int,
    stride: int,
    on_step: Callable[[], None] = lambda: None,
) -> list[tuple[int, float]]:
    """(i, seconds) of the step producing generated token i, for i from `first` to `last`
    every `stride`, `last` always included."""
    indices = sorted({*range(first, last + 1, stride), last})
    out = []
    for i in indices:
        out.append((i, backend.run(prompts_of(prompt_tokens + i), 1).wall_s))
        on_step()
    return out


def extend(run: RunTiming, samples: list[tuple[int, float]], batch_size: int) -> RunTiming:
    """`run` continued to the last sampled token, each missing step interpolated linearly
    between the sampled ones (a step's cost grows smoothly with the sequence)."""
    done = len(run.token_times_s)
    last = samples[-1][0]
    indices = np.arange(done, last + 1)
    steps = np.interp(indices, [i for i, _ in samples], [s for _, s in samples])
    tail = run.token_times_s[-1] + np.cumsum(steps)
    return RunTiming.from_token_times([*run.token_times_s, *tail.tolist()], batch_size)
