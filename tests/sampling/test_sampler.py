"""Sampler: greedy, filters, seeds, temperature statistics and log-probabilities, on tiny vocabs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from kvlm.sampling import Logprob, Sampler, SamplerOutput, SamplingParams, make_generator
from kvlm.sampling.filters import (
    apply_logit_bias,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_top_k_top_p_min_p,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEG_INF = float("-inf")


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    past: Sequence[Sequence[int]] | None = None,
) -> SamplerOutput:
    num_seqs = logits.shape[0]
    return Sampler()(
        logits,
        params,
        generators if generators is not None else [None] * num_seqs,
        past if past is not None else [[] for _ in range(num_seqs)],
    )


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def counts(token_ids: list[int], vocab_size: int) -> list[int]:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab_size).tolist()


def chi_square(observed: list[int], probs: list[float]) -> float:
    total = sum(observed)
    return sum((o - total * p) ** 2 / (total * p) for o, p in zip(observed, probs, strict=True))


# --- greedy and top-k ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50, device=device)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)]).token_ids == [1]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 30)
    logits[0] = torch.tensor([0.0, 5.0, 5.0] + [1.0] * 27)  # a tie: argmax takes the lower id
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(16)]
    generators = [make_generator(p.seed, "cpu") for p in params]
    for _ in range(5):
        out = sample(logits, params, generators)
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_k_most_likely() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.0, 0.5]])
    filtered = apply_top_k_top_p_min_p(logits, torch.tensor([2]), None, None)
    # Ties at the k-th place go to the lower token id: 3 is kept, 4 is not.
    assert filtered.tolist() == [[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF, NEG_INF]]
    filtered = apply_top_k_top_p_min_p(logits, torch.tensor([4]), None, None)
    assert filtered.tolist() == [[NEG_INF, 3.0, NEG_INF, 2.0, 2.0, 0.5]]
    torch.manual_seed(2)
    out = sample(logits.expand(2000, 6), [SamplingParams(top_k=2)] * 2000)
    assert set(out.token_ids) == {1, 3}


def test_top_k_larger_than_vocab_is_off() -> None:
    torch.manual_seed(3)
    out = sample(torch.zeros(3000, 4), [SamplingParams(top_k=100)] * 3000)
    assert set(out.token_ids) == {0, 1, 2, 3}


# --- top-p and min-p -----------------------------------------------------------------------

# Token id -> probability, deliberately not in sorted order.
NUCLEUS_PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.35, {1}),  # 0.4 alone reaches 0.35
        (0.41, {1, 3}),  # 0.4 + 0.3
        (0.65, {1, 3}),
        (0.8, {1, 3, 4}),  # 0.4 + 0.3 + 0.15 = 0.85
        (0.9, {1, 3, 4, 0}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, kept: set[int]) -> None:
    logits = torch.tensor([log_probs(NUCLEUS_PROBS)])
    filtered = apply_top_k_top_p_min_p(logits, None, torch.tensor([top_p]), None)
    assert {i for i, x in enumerate(filtered[0].tolist()) if x > NEG_INF} == kept

    torch.manual_seed(4)
    num_draws = 4000
    out = sample(logits.expand(num_draws, 5), [SamplingParams(top_p=top_p)] * num_draws)
    assert set(out.token_ids) == kept  # never outside the nucleus, every member drawn


def test_top_p_renormalises_after_top_k() -> None:
    # After top_k=2 the distribution is {1: 4/7, 3: 3/7}; top_p=0.5 keeps token 1 alone.
    logits = torch.tensor([log_probs(NUCLEUS_PROBS)])
    filtered = apply_top_k_top_p_min_p(logits, torch.tensor([2]), torch.tensor([0.5]), None)
    assert [x > NEG_INF for x in filtered[0].tolist()] == [False, True, False, False, False]


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [
        (0.0, {0, 1, 2, 3, 4}),
        (0.2, {1, 3, 4, 0}),  # threshold 0.08
        (0.3, {1, 3, 4}),  # threshold 0.12
        (0.5, {1, 3}),  # threshold 0.2
        (1.0, {1}),
    ],
)
def test_min_p_filter(min_p: float, kept: set[int]) -> None:
    logits = torch.tensor([log_probs(NUCLEUS_PROBS)])
    filtered = apply_top_k_top_p_min_p(logits, None, None, torch.tensor([min_p]))
    assert {i for i, x in enumerate(filtered[0].tolist()) if x > NEG_INF} == kept

    torch.manual_seed(5)
    num_draws = 4000
    out = sample(logits.expand(num_draws, 5), [SamplingParams(min_p=min_p)] * num_draws)
    assert set(out.token_ids) == kept


def test_min_p_uses_tempered_distribution() -> None:
    # At temperature 2 the probabilities become proportional to sqrt(p):
    # sqrt(0.05 / 0.4) = 0.354 survives min_p=0.3 although 0.05 / 0.4 = 0.125 would not.
    logits = torch.tensor([log_probs(NUCLEUS_PROBS)]).expand(3000, 5)
    torch.manual_seed(6)
    out = sample(logits, [SamplingParams(min_p=0.3, temperature=2.0)] * 3000)
    assert set(out.token_ids) == {0, 1, 2, 3, 4}


def test_filters_leave_neutral_rows_bit_identical() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 40)
    filtered = apply_top_k_top_p_min_p(
        logits,
        torch.tensor([40, 5, 40]),
        torch.tensor([1.0, 1.0, 0.5]),
        torch.tensor([0.0, 0.0, 0.1]),
    )
    assert torch.equal(filtered[0], logits[0])
    assert (filtered[1] > NEG_INF).sum() == 5
    assert (filtered[2] > NEG_INF).sum() < 40


# --- repetition penalty --------------------------------------------------------------------


def test_repetition_penalty_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 0.0], [2.0, -1.0, 0.5, -3.0, 4.0, 0.0]])
    out = apply_repetition_penalty(logits, [2.0, 1.0], [[0, 1, 1, 3, 5], [9999]])
    # Seen ids 0, 1, 3, 5: positive / 2, negative * 2, zero stays zero; row 1 untouched (its
    # history, out of range on purpose, is never read).
    assert out.tolist() == [
        [1.0, -2.0, 0.5, -6.0, 4.0, 0.0],
        [2.0, -1.0, 0.5, -3.0, 4.0, 0.0],
    ]
    assert logits[0, 0] == 2.0  # input untouched


def test_repetition_penalty_below_one_rewards_seen_tokens() -> None:
    out = apply_repetition_penalty(torch.tensor([[2.0, -1.0, 1.0]]), [0.5], [[0, 1]])
    assert out.tolist() == [[4.0, -0.5, 1.0]]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0], [-0.5, -1.0, -2.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)] * 2
    # Row 0: 3.0 / 2 = 1.5 < 2.0. Row 1: -0.5 * 2 = -1.0, tie with token 1 -> lower id 0 stays;
    # with token 1 seen too: -1.0 vs -2.0 -> 0.
    assert sample(logits, params, past=[[0], [0]]).token_ids == [1, 0]
    assert sample(logits, params, past=[[0, 0, 0], [0, 1]]).token_ids == [1, 0]
    params3 = [SamplingParams(temperature=0, repetition_penalty=3.0)] * 2
    assert sample(logits, params3, past=[[2], [0]]).token_ids == [0, 1]


# --- seeds ---------------------------------------------------------------------------------


def run_steps(
    row_logits: torch.Tensor, batches: list[torch.Tensor], row: int, params: list[SamplingParams]
) -> list[int]:
    """Sample len(batches) steps, the tracked request sitting at `row` of each batch."""
    generators = [make_generator(p.seed, "cpu") for p in params]
    tokens = []
    for batch in batches:
        batch = batch.clone()
        batch[row] = row_logits
        out = sample(batch, params, generators)
        tokens.append(out.token_ids[row])
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    torch.manual_seed(8)
    row_logits = torch.randn(64)
    tracked = SamplingParams(seed=1234, temperature=0.8, top_p=0.95)
    num_steps = 12
    alone = run_steps(row_logits, [torch.zeros(1, 64)] * num_steps, 0, [tracked])

    # Same request at row 2 of a batch mixing greedy, unseeded, other-seeded and filtered rows.
    others = [
        SamplingParams(temperature=0),
        SamplingParams(),
        SamplingParams(seed=99, top_k=5, min_p=0.1),
        SamplingParams(repetition_penalty=1.3, logprobs=3),
    ]
    params = others[:2] + [tracked] + others[2:]
    batches = [torch.randn(5, 64) for _ in range(num_steps)]
    past = [[1, 2, 3]] * 5
    generators = [make_generator(p.seed, "cpu") for p in params]
    mixed = []
    for batch in batches:
        batch[2] = row_logits
        mixed.append(sample(batch, params, generators, past).token_ids[2])
    assert mixed == alone
    assert len(set(alone)) > 1  # it really sampled


def test_different_seeds_differ_on_flat_distribution() -> None:
    flat = torch.zeros(1, 1000)
    first = run_steps(flat[0], [flat] * 8, 0, [SamplingParams(seed=1)])
    second = run_steps(flat[0], [flat] * 8, 0, [SamplingParams(seed=2)])
    again = run_steps(flat[0], [flat] * 8, 0, [SamplingParams(seed=1)])
    assert first == again
    assert first != second


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    generator = make_generator(7, torch.device("cpu"))
    assert generator is not None and generator.initial_seed() == 7


# --- temperature statistics ----------------------------------------------------------------

BASE_PROBS = [0.5, 0.25, 0.125, 0.125]
CHI2_3DOF_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def tempered(probs: list[float], temperature: float) -> list[float]:
    weights = [p ** (1.0 / temperature) for p in probs]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_distribution(temperature: float) -> None:
    num_draws = 20000
    logits = torch.tensor([log_probs(BASE_PROBS)]).expand(num_draws, 4)
    torch.manual_seed(12)  # batched draw from the global RNG: deterministic
    tokens = sample(logits, [SamplingParams(temperature=temperature)] * num_draws).token_ids
    observed = counts(tokens, 4)
    expected = tempered(BASE_PROBS, temperature)
    assert chi_square(observed, expected) < CHI2_3DOF_P001
    if temperature != 1.0:  # and clearly not the untempered distribution
        assert chi_square(observed, BASE_PROBS) > 10 * CHI2_3DOF_P001


def test_seeded_draws_follow_distribution() -> None:
    # One seeded request over many steps (the per-row generator path, not the batched one).
    logits = torch.tensor([log_probs(BASE_PROBS)])
    generators = [make_generator(3, "cpu")]
    params = [SamplingParams(seed=3, temperature=2.0)]
    tokens = [sample(logits, params, generators).token_ids[0] for _ in range(4000)]
    assert chi_square(counts(tokens, 4), tempered(BASE_PROBS, 2.0)) < CHI2_3DOF_P001


# --- log-probabilities ---------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 25) * 3
    params = [
        SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.5),
        SamplingParams(logprobs=None),
        SamplingParams(logprobs=20, temperature=0, top_k=3),
    ]
    out = sample(logits, params, past=[[0, 1, 2], [], []])
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row, k in [(0, 5), (2, 20)]:
        entries = out.logprobs[row]
        assert entries is not None
        order = expected[row].argsort(descending=True).tolist()
        top = list(entries)[:k]
        assert top == order[:k]
        for rank, token in enumerate(top, start=1):
            assert entries[token] == Logprob(expected[row, token].item(), rank)
        sampled = out.token_ids[row]
        assert sampled in entries
        assert entries[sampled].logprob == expected[row, sampled].item()
        assert all(e.decoded_token is None for e in entries.values())


def test_sampled_token_outside_top_k_is_added() -> None:
    # Raw argmax is 0, but the penalty makes greedy pick 1.
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=0),
        SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=1),
    ]
    out = sample(logits, params, past=[[0], [0]])
    assert out.token_ids == [1, 1]
    lp = torch.log_softmax(logits[0], dim=-1).tolist()
    assert out.logprobs[0] == {1: Logprob(lp[1], 2)}
    assert out.logprobs[1] == {0: Logprob(lp[0], 1), 1: Logprob(lp[1], 2)}
    assert list(out.logprobs[1]) == [0, 1]  # top-k first, in rank order


def test_logprob_ranks_with_ties() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0, logprobs=4)])
    ranks = {token: entry.rank for token, entry in out.logprobs[0].items()}  # type: ignore[union-attr]
    assert ranks == {1: 1, 2: 1, 0: 3, 3: 4}


# --- interface -----------------------------------------------------------------------------


def test_input_logits_not_modified() -> None:
    torch.manual_seed(10)
    logits = torch.randn(4, 12)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, top_k=3, top_p=0.8, min_p=0.1, repetition_penalty=1.2),
        SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2),
        SamplingParams(),
        SamplingParams(seed=1),
    ]
    sample(logits, params, [None, None, None, make_generator(1, "cpu")], past=[[1, 2]] * 4)
    assert torch.equal(logits, before)


def test_bfloat16_logits_accepted() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.bfloat16)
    assert sample(logits, [SamplingParams(temperature=0)]).token_ids == [2]


def test_mismatched_lengths_rejected() -> None:
    with pytest.raises(ValueError, match=r"one entry per logits row \(2\): got 1 params"):
        sample(torch.zeros(2, 4), [SamplingParams()])
    with pytest.raises(ValueError, match=r"logits must be \[num_seqs, vocab_size\]"):
        Sampler()(torch.zeros(4), [SamplingParams()], [None], [[]])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_on_device(device: str) -> None:
    torch.manual_seed(11)
    logits = torch.randn(4, 100, device=device)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(seed=5, top_k=10, logprobs=2),
        SamplingParams(top_p=0.5, min_p=0.05, repetition_penalty=1.1),
        SamplingParams(temperature=0.1, top_k=1, seed=6),
    ]
    generators = [make_generator(p.seed, device) for p in params]
    out = sample(logits, params, generators, past=[[0, 1]] * 4)
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == argmax[0]
    assert out.token_ids[3] == argmax[3]
    assert out.token_ids[1] in logits[1].topk(10).indices.tolist()
    assert out.logprobs[1] is not None and len(out.logprobs[1]) in (2, 3)
    assert all(0 <= t < 100 for t in out.token_ids)


# --- logit bias, min_tokens, presence and frequency penalties --------------------------------


def test_logit_bias_is_added_to_the_logits_it_names() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    biased = apply_logit_bias(logits, [((0, 2.5), (3, -1.0)), ()])
    assert biased.tolist() == [[3.5, 2.0, 3.0, -1.0], [1.0, 2.0, 3.0, 0.0]]
    assert logits[0, 0] == 1.0  # the input is not modified


def test_logit_bias_forces_and_bans_greedy_tokens() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={3: 100}),  # the least likely, forced
        SamplingParams(temperature=0.0, logit_bias={2: -100}),  # the argmax, banned
        SamplingParams(temperature=0.0),
    ]
    assert sample(logits, params).token_ids == [3, 1, 2]


def test_logit_bias_leaves_raw_logprobs_alone() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = sample(logits, [SamplingParams(temperature=0.0, logprobs=1, logit_bias={0: 100})])
    assert out.token_ids == [0]
    assert out.logprobs[0][0].rank == 3  # the model's own ranking, as vLLM reports it


def test_logit_bias_outside_the_vocabulary_is_an_error() -> None:
    with pytest.raises(ValueError, match="logit_bias token id 4 is outside the vocabulary of 4"):
        sample(torch.zeros(1, 4), [SamplingParams(logit_bias={4: 1})])


def test_presence_and_frequency_penalties_follow_openai_exactly() -> None:
    # Row 0's prompt is [0, 0] and its output [1, 1, 1, 2]: counts 1 -> 3, 2 -> 1, 0 -> 0
    # (prompt tokens are never counted).
    logits = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    past = [[0, 0, 1, 1, 1, 2]]
    penalised = apply_presence_frequency_penalties(logits, [0.5], [0.25], [past[0][2:]])
    # logit[j] - frequency * count[j] - presence * (count[j] > 0)
    assert penalised.tolist() == [[5.0, 5.0 - 0.75 - 0.5, 5.0 - 0.25 - 0.5, 5.0]]
    negative = apply_presence_frequency_penalties(logits, [-1.0], [-2.0], [past[0][2:]])
    assert negative.tolist() == [[5.0, 5.0 + 6.0 + 1.0, 5.0 + 2.0 + 1.0, 5.0]]


def test_penalties_count_output_tokens_only_through_the_sampler() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.2)] * 2
    past = [[0, 0, 0], [0, 0, 0]]
    # Row 0 generated nothing yet (all its 0s are prompt); row 1 generated one 0.
    out = Sampler()(logits, params, [None, None], past, num_output_tokens=[0, 1])
    assert out.token_ids == [0, 1]


def test_zero_penalties_leave_rows_bit_for_bit() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 20)
    out = apply_presence_frequency_penalties(logits, [0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                                             [[], [4, 4], []])  # fmt: skip
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 4] == logits[1, 4] - 1.0


def test_penalties_need_the_output_counts() -> None:
    with pytest.raises(ValueError, match="num_output_tokens"):
        sample(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="num_output_tokens"):
        sample(torch.zeros(1, 4), [SamplingParams(min_tokens=2, max_tokens=4)])


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 4)  # 1 = EOS is the argmax
    sampler = Sampler(eos_token_ids=[1])
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),
        SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0),
    ]
    out = sampler(logits, params, [None] * 4, [[0]] * 4, num_output_tokens=[2, 3, 0, 0])
    # row 0: 2 < 3 tokens so far, EOS (1) and stop id 2 banned; row 1 reached min_tokens;
    # row 2 ignores EOS, which is then no stop token; row 3 has no min_tokens.
    assert out.token_ids == [3, 1, 1, 1]
