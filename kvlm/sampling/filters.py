"""Batched logit transforms used by the sampler: logit bias, banned tokens (min_tokens),
repetition / presence / frequency penalties, and top-k / top-p / min-p.

Each function takes `[num_seqs, vocab_size]` float logits plus one parameter per row, returns
new logits (the input is never modified) and leaves a row untouched when its parameter is the
neutral value (no bias, nothing banned, penalty 1 or 0, top_k 0, top_p 1, min_p 0), bit for
bit. Filtered-out tokens get logit -inf. None of them moves data from the device to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_repetition_penalty(
    logits: torch.Tensor,
    penalties: Sequence[float],
    past_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Penalise every token id already seen by its row (prompt or output, counted once).

    A positive logit is divided by the row's penalty, a negative one multiplied, so a penalty
    > 1 always makes a seen token less likely. `past_token_ids[i]` is read only when
    `penalties[i] != 1`; every id in it must be < vocab_size.
    """
    rows = [i for i, penalty in enumerate(penalties) if penalty != 1.0]
    if not rows:
        return logits
    num_seqs, _ = logits.shape
    device = logits.device

    # Flatten (row, token) pairs on the host, then copy them over once.
    ids_per_row = [torch.as_tensor(past_token_ids[i], dtype=torch.long) for i in rows]
    lengths = torch.tensor([len(ids) for ids in ids_per_row], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    token_idx = torch.cat(ids_per_row)
    seen = torch.zeros_like(logits, dtype=torch.bool)  # [num_seqs, vocab_size]
    seen[row_idx.to(device), token_idx.to(device)] = True

    penalty = torch.tensor(penalties, dtype=logits.dtype).to(device).view(num_seqs, 1)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _row_token_pairs(
    rows: Sequence[int], ids_per_row: Sequence[Sequence[int]], vocab_size: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, token id) index pairs, built on the host: `ids_per_row[k]` are row
    `rows[k]`'s ids. Raises ValueError naming `what` for an id outside the vocabulary."""
    flat_rows = [row for row, ids in zip(rows, ids_per_row, strict=True) for _ in ids]
    flat_ids = [token_id for ids in ids_per_row for token_id in ids]
    bad = [t for t in flat_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} token id {bad[0]} is outside the vocabulary of {vocab_size}")
    return torch.tensor(flat_rows, dtype=torch.long), torch.tensor(flat_ids, dtype=torch.long)


def apply_logit_bias(
    logits: torch.Tensor, logit_biases: Sequence[Sequence[tuple[int, float]]]
) -> torch.Tensor:
    """Add each row's `(token_id, bias)` pairs to its logits (OpenAI's `logit_bias`)."""
    rows = [i for i, pairs in enumerate(logit_biases) if pairs]
    if not rows:
        return logits
    ids = [[token_id for token_id, _ in logit_biases[i]] for i in rows]
    row_idx, token_idx = _row_token_pairs(rows, ids, logits.shape[1], "logit_bias")
    biases = torch.tensor([b for i in rows for _, b in logit_biases[i]], dtype=logits.dtype)
    device = logits.device
    return logits.index_put((row_idx.to(device), token_idx.to(device)), biases.to(device),
                            accumulate=True)  # fmt: skip


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """Give `banned[i]`'s ids logit -inf in row i (min_tokens: no stop token yet)."""
    rows = [i for i, ids in enumerate(banned) if ids]
    if not rows:
        return logits
    row_idx, token_idx = _row_token_pairs(rows, [banned[i] for i in rows], logits.shape[1], "stop")
    device = logits.device
    return logits.index_put(
        (row_idx.to(device), token_idx.to(device)), torch.tensor(float("-inf"), device=device)
    )


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    presence: Sequence[float],
    frequency: Sequence[float],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """OpenAI's rule over each row's generated tokens (never its prompt):
    `logit[j] -= frequency * count[j] + presence * (count[j] > 0)`.

    `output_token_ids[i]` is read only when row i has a non-zero presence or frequency.
    """
    rows = [i for i in range(len(presence)) if presence[i] != 0.0 or frequency[i] != 0.0]
    if not rows:
        return logits
    num_seqs, vocab_size = logits.shape
    device, dtype = logits.device, logits.dtype
    ids = [output_token_ids[i] for i in rows]
    row_idx, token_idx = _row_token_pairs(rows, ids, vocab_size, "output")
    counts = torch.zeros_like(logits)  # [num_seqs, vocab_size]
    ones = torch.ones(len(token_idx), dtype=dtype, device=device)
    counts.index_put_((row_idx.to(device), token_idx.to(device)), ones, accumulate=True)
    alpha_frequency = torch.tensor(frequency, dtype=dtype).to(device).view(num_seqs, 1)
    alpha_presence = torch.tensor(presence, dtype=dtype).to(device).view(num_seqs, 1)
    penalty = alpha_frequency * counts + alpha_presence * (counts > 0).to(dtype)
    return torch.where(counts > 0, logits - penalty, logits)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Mask, in this order, tokens outside the top-k, outside the top-p nucleus, below min-p.

    logits: `[num_seqs, vocab_size]`; top_k (int64), top_p and min_p (float): `[num_seqs]`, or
    None when no row uses that filter. Rows that do not use one hold its neutral value
    (top_k == vocab_size, top_p == 1, min_p == 0).

    - top-k keeps exactly k tokens; ties are broken towards the lower token id, as argmax does,
      so top_k = 1 is greedy.
    - top-p works on the distribution left by top-k (renormalised) and keeps the smallest
      prefix of most likely tokens whose mass reaches p: a token stays iff the mass of the
      tokens ranked above it is < p.
    - min-p keeps tokens with probability >= min_p * (probability of the most likely token).
      That ratio does not depend on renormalisation, so min-p is unaffected by the filters
      before it; top-p, applied first, does not see min-p's removals.

    The most likely token always survives all three, so no row is left empty.
    """
    if top_k is None and top_p is None and min_p is None:
        return logits
    num_seqs, vocab_size = logits.shape
    # Stable descending sort: equal logits keep ascending token id order.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [num_seqs, vocab_size] sorted

    if top_k is not None:
        positions = torch.arange(vocab_size, device=logits.device)  # [vocab_size]
        remove = positions.unsqueeze(0) >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))

    if top_p is not None or min_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [num_seqs, vocab_size] sorted
        if top_p is not None:
            # Exclusive cumsum by shifting (subtracting probs would cancel digits).
            mass_above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
            # top_p == 1 keeps everything; cumsum rounding must not drop the tail.
            active = (top_p < 1.0).unsqueeze(1)
            remove = remove | (active & (mass_above >= top_p.unsqueeze(1)))
        if min_p is not None:
            threshold = min_p.unsqueeze(1) * probs[:, :1]
            remove = remove | (probs < threshold)

    # Back from sorted positions to token ids.
    remove_by_id = torch.empty_like(remove).scatter_(1, sorted_idx, remove)
    return logits.masked_fill(remove_by_id, float("-inf"))
