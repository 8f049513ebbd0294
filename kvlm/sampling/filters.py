"""Batched logit transforms used by the sampler: repetition penalty and top-k / top-p / min-p.

Each function takes `[num_seqs, vocab_size]` float logits plus one parameter per row, returns
new logits (the input is never modified) and leaves a row untouched when its parameter is the
neutral value (penalty 1, top_k 0, top_p 1, min_p 0), bit for bit. Filtered-out tokens get
logit -inf. None of them moves data from the device to the host.
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
