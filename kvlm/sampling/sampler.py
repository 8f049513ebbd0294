"""Turn one step's logits into one token per sequence, plus optional log-probabilities.

Per row, in this order:
  0. a grammar's mask (`RowMask`, structured outputs): tokens it does not allow get logit
     -inf, in the constrained rows only, before anything else reads the logits;
  1. min_tokens: while fewer than `min_tokens` tokens were generated, the stop token ids
     (EOS unless ignore_eos, and `stop_token_ids`) get logit -inf;
  2. logit_bias: added to the raw logits;
  3. repetition penalty (every id in the prompt or output), then presence and frequency
     penalties (generated ids only, OpenAI's rule); rows at the neutral value are untouched;
  4. greedy rows (temperature 0) take the argmax of the result and stop here;
  5. temperature: logits / temperature;
  6. top-k, 7. top-p, 8. min-p (see `filters.apply_top_k_top_p_min_p`);
  9. sample with the exponential race: argmax(p_i / q_i), q_i ~ Exp(1), computed as
     argmax(logit_i - log q_i). q for a row comes from that row's generator (or torch's global
     RNG when it has none) and has vocab_size entries, so a seeded row's token depends only on
     its seed, its logits and how many steps its generator has run, never on the rest of the
     batch.
Log-probabilities are those of the raw model output (log_softmax before bias, penalties and
temperature; after a grammar's mask, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from kvlm.kernels.bitmask import apply_token_bitmask_
from kvlm.kernels.reduce import argmax_rows
from kvlm.sampling.filters import (
    apply_logit_bias,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_top_k_top_p_min_p,
    ban_tokens,
)
from kvlm.sampling.params import SamplingParams


@dataclass
class Logprob:
    """One token's log-probability; rank 1 = most likely (1 + count of strictly likelier)."""

    logprob: float
    rank: int
    decoded_token: str | None = None  # filled in by the engine, which owns the tokenizer


@dataclass
class SamplerOutput:
    """One entry per sequence, in the order of the logits rows."""

    token_ids: list[int]
    # Top-`params.logprobs` entries in rank order, then the sampled token if it was not among
    # them; None for rows whose params.logprobs is None.
    logprobs: list[dict[int, Logprob] | None]


@dataclass(frozen=True)
class RowMask:
    """Tokens a grammar allows, in some rows of a step's logits."""

    rows: list[int]  # logits rows
    # [len(rows), ceil(vocab_size / 32)] int32: bit j of word w set = token 32 * w + j allowed
    allowed: torch.Tensor

    @torch.inference_mode()  # the runner's logits are inference tensors: written in place
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` ([num_seqs, vocab_size] float) with the tokens not allowed at -inf, in
        place, in the constrained rows only (nothing read or written in the other rows)."""
        words = (logits.shape[1] + 31) // 32
        if self.allowed.shape != (len(self.rows), words):
            raise ValueError(
                f"mask is {tuple(self.allowed.shape)} for {len(self.rows)} rows of "
                f"{logits.shape[1]} logits (want [{len(self.rows)}, {words}] int32 words)"
            )
        apply_token_bitmask_(logits, self.allowed.to(logits.device), self.rows)
        return logits


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator for `seed`; None (= torch's global RNG) when seed is None.

    It must live on the device the logits live on.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless apart from the model's EOS ids; all per-request state (generators, history)
    is passed in by the engine.

    `eos_token_ids` are the ids that end a request unless its params say `ignore_eos`; they
    are banned, with `params.stop_token_ids`, while a request has not reached `min_tokens`.
    """

    def __init__(self, eos_token_ids: Collection[int] = ()) -> None:
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos_token_ids))

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        past_token_ids: Sequence[Sequence[int]],
        num_output_tokens: Sequence[int] | None = None,
        mask: RowMask | None = None,
    ) -> SamplerOutput:
        """Sample one token for each row of `logits` ([num_seqs, vocab_size]).

        `generators[i]` is request i's generator (from `make_generator`) or None;
        `past_token_ids[i]` its prompt + generated ids, read only when a penalty is set;
        `num_output_tokens[i]` how many of those were generated, required when a row sets
        min_tokens or a presence / frequency penalty (the rule counts generated tokens only).
        `mask` bans tokens in the rows a grammar constrains (`logits` is then written in place).
        Moves data to the host once for the token ids, and once more for the
        log-probabilities when any row asks for them.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [num_seqs, vocab_size], got shape {logits.shape}")
        num_seqs = logits.shape[0]
        if not len(params) == len(generators) == len(past_token_ids) == num_seqs:
            raise ValueError(
                f"need one entry per logits row ({num_seqs}): got {len(params)} params, "
                f"{len(generators)} generators, {len(past_token_ids)} past_token_ids"
            )
        if num_output_tokens is not None and len(num_output_tokens) != num_seqs:
            raise ValueError(
                f"need one num_output_tokens entry per logits row ({num_seqs}), "
                f"got {len(num_output_tokens)}"
            )
        raw = logits.float()
        if mask is not None:
            raw = mask.apply(raw)
        logits = self.adjusted_logits(raw, params, past_token_ids, num_output_tokens)
        token_ids = _select_tokens(logits, params, generators)  # [num_seqs] int64
        if all(p.logprobs is None for p in params):
            logprobs: list[dict[int, Logprob] | None] = [None] * num_seqs
        else:
            logprobs = gather_logprobs(raw, token_ids, [p.logprobs for p in params])
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def adjusted_logits(
        self,
        raw: torch.Tensor,
        params: Sequence[SamplingParams],
        past_token_ids: Sequence[Sequence[int]],
        num_output_tokens: Sequence[int] | None,
    ) -> torch.Tensor:
        """Steps 1-3 on float32 `raw` ([num_seqs, vocab_size]): min_tokens, logit_bias and
        penalties. A greedy row's token is the argmax of the result; a random row's
        distribution is `sampling_logits` of it (speculative decoding verifies against both)."""
        logits = self._ban_stop_tokens(raw, params, num_output_tokens)
        logits = apply_logit_bias(logits, [p.logit_bias for p in params])
        penalties = [p.repetition_penalty for p in params]
        logits = apply_repetition_penalty(logits, penalties, past_token_ids)
        return apply_presence_frequency_penalties(
            logits,
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
            _output_token_ids(params, past_token_ids, num_output_tokens),
        )

    def _ban_stop_tokens(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        num_output_tokens: Sequence[int] | None,
    ) -> torch.Tensor:
        if all(p.min_tokens == 0 for p in params):
            return logits
        if num_output_tokens is None:
            raise ValueError("min_tokens needs num_output_tokens (generated tokens per row)")
        banned = [
            (p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids))
            if n < p.min_tokens
            else ()
            for p, n in zip(params, num_output_tokens, strict=True)
        ]
        return ban_tokens(logits, banned)


def _output_token_ids(
    params: Sequence[SamplingParams],
    past_token_ids: Sequence[Sequence[int]],
    num_output_tokens: Sequence[int] | None,
) -> list[Sequence[int]]:
    """Each row's generated ids (the tail of its past ids); empty for rows without
    presence / frequency penalties, which never read them."""
    wanted = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
    if not any(wanted):
        return [()] * len(params)
    if num_output_tokens is None:
        raise ValueError(
            "presence_penalty and frequency_penalty need num_output_tokens "
            "(generated tokens per row)"
        )
    return [
        past[len(past) - n :] if want and n > 0 else ()
        for want, past, n in zip(wanted, past_token_ids, num_output_tokens, strict=True)
    ]


def _select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Greedy rows: argmax. Other rows: temperature, filters, exponential race. -> [num_seqs]"""
    num_seqs = logits.shape[0]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not random_rows:
        return argmax_rows(logits)
    if len(random_rows) == num_seqs:
        return _sample(logits, params, generators)
    token_ids = argmax_rows(logits)
    rows = torch.tensor(random_rows, dtype=torch.long).to(logits.device)
    token_ids[rows] = _sample(
        logits[rows],
        [params[i] for i in random_rows],
        [generators[i] for i in random_rows],
    )
    return token_ids


def _sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Random sampling for non-greedy rows. logits: [num_rows, vocab_size] -> [num_rows]"""
    return race(sampling_logits(logits, params), generators)


def sampling_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Steps 5-8 for non-greedy rows ([num_rows, vocab_size]): temperature, then top-k, top-p
    and min-p; its softmax is the distribution each row's token is drawn from."""
    vocab_size = logits.shape[1]
    device, dtype = logits.device, logits.dtype

    def row_tensor(values: list[float] | list[int], tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=tensor_dtype).to(device)  # [num_rows]

    temperatures = [p.temperature for p in params]
    if any(t != 1.0 for t in temperatures):
        logits = logits / row_tensor(temperatures, dtype).unsqueeze(1)

    top_k = top_p = min_p = None
    if any(p.top_k > 0 for p in params):
        ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        top_k = row_tensor(ks, torch.long)
    if any(p.top_p < 1.0 for p in params):
        top_p = row_tensor([p.top_p for p in params], dtype)
    if any(p.min_p > 0.0 for p in params):
        min_p = row_tensor([p.min_p for p in params], dtype)
    return apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)


def race(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Step 9: one token per row of `logits` ([num_rows, vocab_size]) drawn from its softmax,
    argmax(logit_i - log q_i) with q_i ~ Exp(1) from the row's generator. -> [num_rows]"""
    dtype = logits.dtype
    q = torch.empty_like(logits)  # [num_rows, vocab_size], ~ Exp(1)
    if any(g is None for g in generators):
        q.exponential_()  # global RNG, one call for the whole batch
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    # A zero draw would make log(q) -inf and turn a masked (-inf) logit into NaN.
    q.clamp_(min=torch.finfo(dtype).tiny)
    return (logits - q.log()).argmax(dim=-1)


def gather_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    num_top: Sequence[int | None],
) -> list[dict[int, Logprob] | None]:
    """Log-probs of `logits` rows ([num_rows, vocab_size]): per row, its `num_top[i]` most
    likely tokens plus `token_ids[i]` (the sampled token, or a prompt token being scored), in
    one transfer; None for rows whose `num_top` is None."""
    rows = [i for i, k in enumerate(num_top) if k is not None]
    counts = [num_top[i] or 0 for i in rows]
    k_max = max(counts)
    device = logits.device
    if len(rows) < len(num_top):
        row_idx = torch.tensor(rows, dtype=torch.long).to(device)
        logits, token_ids = logits[row_idx], token_ids[row_idx]

    logprobs = logits.log_softmax(dim=-1)  # [num_rows, vocab_size]
    sampled = token_ids.unsqueeze(1)  # [num_rows, 1]
    sampled_lp = logprobs.gather(1, sampled)  # [num_rows, 1]
    sampled_rank = 1 + (logprobs > sampled_lp).sum(dim=-1, keepdim=True)  # [num_rows, 1]
    top_lp, top_ids = logprobs.topk(k_max, dim=-1)  # [num_rows, k_max]
    # Any token likelier than a top-k entry is itself in the top-k, so counting within the
    # top-k gives the exact rank.
    top_rank = 1 + (top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=-1)  # [num_rows, k_max]

    # float64 holds token ids and ranks exactly; one transfer for everything.
    parts = [sampled, sampled_lp, sampled_rank, top_ids, top_lp, top_rank]
    payload = torch.cat([t.to(torch.float64) for t in parts], dim=1)  # [num_rows, 3 + 3 * k_max]
    host_rows = payload.tolist()

    out: list[dict[int, Logprob] | None] = [None] * len(num_top)
    for row, count, values in zip(rows, counts, host_rows, strict=True):
        ids = values[3 : 3 + k_max]
        lps = values[3 + k_max : 3 + 2 * k_max]
        ranks = values[3 + 2 * k_max :]
        entries = {int(ids[j]): Logprob(lps[j], int(ranks[j])) for j in range(count)}
        sampled_id = int(values[0])
        if sampled_id not in entries:
            entries[sampled_id] = Logprob(values[1], int(values[2]))
        out[row] = entries
    return out
