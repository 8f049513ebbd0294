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

    Rows are first filtered among their `CANDIDATES` best tokens (`topk`, no full sort); the
    full-vocabulary sort runs only when some row's kept set may reach past them.
    """
    if top_k is None and top_p is None and min_p is None:
        return logits
    filtered, unsettled = _filter_candidates(logits, top_k, top_p, min_p)
    if unsettled is None:
        return filtered
    rows = unsettled.nonzero().squeeze(1)  # [num_unsettled]; the one host sync

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows]

    filtered[rows] = _filter_sorted(logits[rows], pick(top_k), pick(top_p), pick(min_p))
    return filtered


# The pre-filter's width: the nucleus of a sampled row almost always lies among this many of
# its best tokens, and `topk` of that many costs a small fraction of sorting 262,144 logits.
CANDIDATES = 1024


def _remove_sorted(
    sorted_logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    log_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The removal mask over a row-wise descending list of logits (the whole vocabulary, or
    its first entries): `[num_seqs, n]` bool. Each filter removes a suffix of the order.
    `log_norm` ([num_seqs, 1]): the log of the softmax denominator after top-k, needed when
    the list is only the head of the vocabulary; None computes it from the list itself."""
    num_seqs, n = sorted_logits.shape
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [num_seqs, n]
    if top_k is not None:
        positions = torch.arange(n, device=sorted_logits.device)  # [n]
        remove = positions.unsqueeze(0) >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    if top_p is not None or min_p is not None:
        if log_norm is None:
            log_norm = sorted_logits.logsumexp(dim=-1, keepdim=True)
        probs = (sorted_logits - log_norm).exp()  # [num_seqs, n]
        if top_p is not None:
            # Exclusive cumsum by shifting (subtracting probs would cancel digits).
            mass_above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
            # top_p == 1 keeps everything; cumsum rounding must not drop the tail.
            active = (top_p < 1.0).unsqueeze(1)
            remove = remove | (active & (mass_above >= top_p.unsqueeze(1)))
        if min_p is not None:
            threshold = min_p.unsqueeze(1) * probs[:, :1]
            remove = remove | (probs < threshold)
    return remove


def _filter_candidates(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The filters applied among each row's `CANDIDATES` best tokens, and which rows that
    leaves unsettled (`[num_seqs]` bool; None when every row is settled, one host sync to
    know): their entries in the result are meaningless and must come from the full sort.

    A row is settled when its filters remove the last candidate and every token they keep is
    strictly likelier than it: every token outside the candidates is then removed too.
    Rows with no filter (top_k == vocab_size, top_p == 1, min_p == 0) are left untouched.
    """
    num_seqs, vocab_size = logits.shape
    width = CANDIDATES + 1  # the candidates, then the best token outside them
    if 2 * width > vocab_size:
        return logits.clone(), torch.ones(num_seqs, dtype=torch.bool, device=logits.device)
    values, ids = logits.topk(width, dim=-1)  # [num_seqs, width], descending
    # topk's order among equal logits is unspecified; the full sort's is ascending id.
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)

    neutral = torch.ones(num_seqs, dtype=torch.bool, device=logits.device)  # [num_seqs]
    log_norm = logits.logsumexp(dim=-1, keepdim=True)  # [num_seqs, 1], without top-k
    if top_k is not None:
        neutral &= top_k >= vocab_size
        # A top-k that keeps more than the candidates (but not all) cannot be settled here.
        cut = (top_k < width) | (top_k >= vocab_size)
        head = values.masked_fill(
            torch.arange(width, device=logits.device).unsqueeze(0) >= top_k.unsqueeze(1),
            float("-inf"),
        )
        log_norm = torch.where(
            (top_k < width).unsqueeze(1), head.logsumexp(dim=-1, keepdim=True), log_norm
        )
    else:
        cut = torch.ones_like(neutral)
    if top_p is not None:
        neutral &= top_p >= 1.0
    if min_p is not None:
        neutral &= min_p <= 0.0

    remove = _remove_sorted(values, top_k, top_p, min_p, log_norm)  # [num_seqs, width]
    kept_min = values.masked_fill(remove, float("inf")).amin(dim=-1)  # [num_seqs]
    settled = neutral | (cut & remove[:, -1] & (kept_min > values[:, -1]))
    keep = torch.zeros_like(logits, dtype=torch.bool)  # [num_seqs, vocab_size]
    keep.scatter_(1, ids, ~remove)
    keep |= neutral.unsqueeze(1)
    filtered = logits.masked_fill(~keep, float("-inf"))
    return filtered, None if bool(settled.all()) else ~settled


def _filter_sorted(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """The filters over a full-vocabulary stable sort: exact for every row."""
    # Stable descending sort: equal logits keep ascending token id order.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    remove = _remove_sorted(sorted_logits, top_k, top_p, min_p)  # [num_seqs, vocab_size]
    # Back from sorted positions to token ids.
    remove_by_id = torch.empty_like(remove).scatter_(1, sorted_idx, remove)
    return logits.masked_fill(remove_by_id, float("-inf"))
