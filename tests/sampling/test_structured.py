"""Structured outputs below the server: StructuredOutputsParams' checks, the grammar compiler's
refusals, masks against what llguidance's matcher accepts, mask lanes, RowMask touching
constrained rows only, the sampler never picking a token the mask bans, and generation on
SmolLM2 (each kind of constraint, a batch mixing constrained and unconstrained requests,
preemption, the prefix cache, max_tokens inside a value)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from kvlm import LLM, SamplingParams, StructuredOutputsParams
from kvlm.sampling import RowMask, SamplingParamsError
from kvlm.sampling.structured import StructuredDecoder
from kvlm.sampling.structured_grammar import StructuredOutputsError
from kvlm.tokenizer import Tokenizer
from kvlm.tokenizer.llguidance_bridge import llguidance_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}, "name": {"type": "string"}},
                "required": ["kind", "name"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _banned(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """A packed bitmask row ([words] int32) as [vocab] bool, True = not allowed."""
    bits = (allowed.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # [words, 32]
    return bits.flatten()[:vocab] == 0


def _greedy(max_tokens: int = 80, **constraint: object) -> SamplingParams:
    spec = StructuredOutputsParams(**constraint) if constraint else None  # type: ignore[arg-type]
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=spec)


# --- parameters -------------------------------------------------------------------------


def test_exactly_one_constraint_and_normalised_values() -> None:
    with pytest.raises(SamplingParamsError, match="exactly one of json, regex.*got none"):
        StructuredOutputsParams()
    with pytest.raises(SamplingParamsError, match="got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(SamplingParamsError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(SamplingParamsError, match="an object"):
        StructuredOutputsParams(json="[1]")
    with pytest.raises(SamplingParamsError, match="non-empty list of strings"):
        StructuredOutputsParams(choice="yes")
    with pytest.raises(SamplingParamsError, match="non-empty strings only"):
        StructuredOutputsParams(choice=["yes", 3])
    with pytest.raises(SamplingParamsError, match="must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})
    as_dict = StructuredOutputsParams(json={"b": {"type": "object"}, "a": 1})
    as_text = StructuredOutputsParams(json='{"b": {"type": "object"}, "a": 1}')
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert list(json.loads(as_dict.json)) == ["b", "a"]  # key order kept: generation order
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


# --- compiler and masks (SmolLM2's tokenizer, no model) ---------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module", params=[True, False], ids=["worker", "engine-thread"])
def decoder(tokenizer: Tokenizer, request: pytest.FixtureRequest) -> StructuredDecoder:
    """Masks prefetched on the worker thread, and computed inline (no core to spare)."""
    vocab = tokenizer.vocab_size
    decoder = StructuredDecoder(
        lambda: llguidance_tokenizer(tokenizer, vocab, [2]), vocab, overlap=request.param
    )
    yield decoder
    decoder.close()


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        ({"regex": "a("}, ["the regex cannot be used", "unclosed group"]),
        ({"json": {"type": "foo"}}, ["the JSON schema cannot be used", "foo"]),
        ({"json": {"type": "object", "dependentSchemas": {}}}, ["dependentSchemas"]),
        ({"grammar": "start: missing"}, ["the grammar cannot be used", "missing"]),
        ({"regex": "[^\\x00-\\U0010FFFF]"}, ["allows no output at all"]),
    ],
)
def test_unusable_constraints_are_refused_saying_why(
    decoder: StructuredDecoder, constraint: dict, words: list[str]
) -> None:
    with pytest.raises(StructuredOutputsError) as error:
        decoder.start(StructuredOutputsParams(**constraint))
    for word in words:
        assert word in str(error.value)


def test_masks_allow_exactly_what_the_matcher_accepts(
    decoder: StructuredDecoder, tokenizer: Tokenizer
) -> None:
    grammar = decoder.start(StructuredOutputsParams(choice=["yes", "no"]))
    banned = _banned(decoder.masks([None, grammar]).allowed[0], tokenizer.vocab_size)
    allowed = torch.nonzero(~banned).flatten().tolist()
    assert 0 < len(allowed) < 20
    for token_id in allowed:  # each allowed token is a valid start, each banned one is not
        assert grammar.matcher.validate_tokens([token_id]) == 1
    for token_id in tokenizer.encode(" maybe yes", add_special_tokens=False)[:1]:
        assert banned[token_id] and grammar.matcher.validate_tokens([token_id]) == 0
    (yes,) = tokenizer.encode("yes", add_special_tokens=False)
    assert decoder.advance(grammar, yes)  # complete: nothing can follow "yes"
    with pytest.raises(AssertionError, match="not prefetched"):
        decoder.masks([grammar])


def test_prefetched_masks_follow_the_matcher(decoder: StructuredDecoder, tokenizer: Tokenizer):
    grammars = [decoder.start(StructuredOutputsParams(regex="[0-9]+-[a-z]+")) for _ in range(2)]
    for g, text in zip(grammars, ["12", "7"], strict=True):
        for token_id in tokenizer.encode(text, add_special_tokens=False):
            assert not decoder.advance(g, token_id)
    decoder.prefetch(grammars)
    mask = decoder.masks(grammars)
    (dash,) = tokenizer.encode("-", add_special_tokens=False)
    (letters,) = tokenizer.encode("abc", add_special_tokens=False)
    banned = [_banned(row, tokenizer.vocab_size) for row in mask.allowed]
    assert mask.rows == [0, 1] and not any(b[dash] for b in banned)
    assert all(b[letters] for b in banned)  # a letter before the dash breaks the regex


def test_without_a_spare_core_masks_are_done_before_the_forward(tokenizer: Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    decoder = StructuredDecoder(
        lambda: llguidance_tokenizer(tokenizer, vocab, [2]), vocab, overlap=False
    )
    grammars = [decoder.start(StructuredOutputsParams(regex="[0-9]+")) for _ in range(3)]
    for g in grammars:
        assert not decoder.advance(g, tokenizer.encode("7", add_special_tokens=False)[0])
    decoder.prefetch(grammars)
    decoder.before_forward()
    assert all(g.pending is not None and g.pending.done() for g in grammars)
    decoder.close()


def test_lanes_compile_apart_and_give_the_same_masks(tokenizer: Tokenizer) -> None:
    """Requests take lanes in turn; each lane has its own compiled matcher (copies of one
    matcher share a lock, so one lane's thread would wait for another's), and the masks do
    not depend on the lane."""
    vocab = tokenizer.vocab_size
    decoder = StructuredDecoder(
        lambda: llguidance_tokenizer(tokenizer, vocab, [2]), vocab, overlap=False, num_lanes=2
    )
    spec = StructuredOutputsParams(json=PERSON)
    grammars = [decoder.start(spec) for _ in range(4)]
    assert [g.lane for g in grammars] == [0, 1, 0, 1]
    lane0, lane1 = (decoder.compiler.compile(spec, lane).matcher for lane in (0, 1))
    assert lane0 is not lane1 and decoder.compiler.compile(spec, 0).matcher is lane0
    for token_id in tokenizer.encode('{"name": "Al', add_special_tokens=False):
        for g in grammars:
            assert not decoder.advance(g, token_id)
        decoder.prefetch(grammars)
        decoder.before_forward()
        mask = decoder.masks(grammars)
        assert all(torch.equal(row, mask.allowed[0]) for row in mask.allowed)
        assert mask.allowed.dtype == torch.int32 and mask.allowed.shape == (4, (vocab + 31) // 32)
    decoder.close()


def test_row_mask_touches_constrained_rows_only() -> None:
    logits = torch.randn(3, 40)
    before = logits.clone()
    allowed = torch.tensor([[0b11, 0]], dtype=torch.int32)  # tokens 0 and 1 allowed
    RowMask([1], allowed).apply(logits)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.equal(logits[1, :2], before[1, :2]) and torch.isinf(logits[1, 2:]).all()
    with pytest.raises(ValueError, match="mask is"):
        RowMask([0, 1], allowed).apply(logits)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_never_picks_a_banned_token_and_leaves_free_rows_alone(temperature: float):
    """Masked rows whose likeliest tokens are all banned sample an allowed token, greedy or
    random; the unmasked rows sample exactly what they sample with no mask in the batch."""
    from kvlm.sampling import Sampler, make_generator

    vocab, num_seqs = 1000, 6
    logits = torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(7))
    allowed_ids = [[3, 500], [999], [0, 1, 2, 640]]  # rows 1, 2 and 4
    rows = [1, 2, 4]
    for row, ids in zip(rows, allowed_ids, strict=True):
        logits[row, ids] -= 20.0  # the argmax and the likely tokens are all banned
    bitmask = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for i, ids in enumerate(allowed_ids):
        for t in ids:
            bitmask[i, t // 32] |= 1 << (t % 32)
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(num_seqs)]
    sampler = Sampler()

    def sample(mask: RowMask | None) -> list[int]:
        generators = [make_generator(p.seed, "cpu") for p in params]
        out = sampler(logits.clone(), params, generators, [[1]] * num_seqs, [0] * num_seqs, mask)
        return out.token_ids

    free = sample(None)
    for _ in range(20 if temperature else 1):
        masked = sample(RowMask(rows, bitmask))
        for row, ids in zip(rows, allowed_ids, strict=True):
            assert masked[row] in ids
        assert [masked[r] for r in (0, 3, 5)] == [free[r] for r in (0, 3, 5)]


# --- generation (SmolLM2) ---------------------------------------------------------------


def test_each_kind_of_constraint_holds(smollm2_llm) -> None:
    prompt = CHAT.format("Describe a person and their pets as JSON.")
    person, regex, choice, obj, lark = smollm2_llm.generate(
        [prompt, "My phone code is", "Is the sky blue? Answer:", prompt, "Count:"],
        [
            _greedy(json=PERSON, max_tokens=120),
            _greedy(regex=r"[0-9]{3}-[a-z]{2,8}"),
            _greedy(choice=["yes", "no", "maybe"]),
            _greedy(json_object=True, max_tokens=120),
            _greedy(grammar='start: "ab" NUM "!"\nNUM: /[0-9]{1,6}/'),
        ],
    )
    jsonschema.validate(json.loads(person.outputs[0].text), PERSON)
    assert person.outputs[0].finish_reason == "stop" and person.outputs[0].stop_reason is None
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,8}", regex.outputs[0].text)
    assert choice.outputs[0].text in ("yes", "no", "maybe")
    assert isinstance(json.loads(obj.outputs[0].text), dict)
    assert re.fullmatch(r"ab[0-9]{1,6}!", lark.outputs[0].text)


def test_max_tokens_inside_a_value_says_length(smollm2_llm) -> None:
    prompt = CHAT.format("A person as JSON.")
    out = smollm2_llm.generate([prompt], _greedy(json=PERSON, max_tokens=5))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


def test_unconstrained_rows_are_unchanged_beside_constrained_ones(smollm2_llm) -> None:
    prompts = ["The capital of France is", "Once upon a time", CHAT.format("JSON please")]
    alone = smollm2_llm.generate(prompts[:2], _greedy(24))
    mixed = smollm2_llm.generate(prompts, [_greedy(24), _greedy(24), _greedy(json=PERSON)])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[2].outputs[0].text), PERSON)


def test_preemption_and_prefix_cache_keep_the_matcher_in_step(smollm2_llm) -> None:
    """Tokens and grammar state survive recomputation: the same JSON as one unpreempted run;
    a repeat hitting the prefix cache gives it again."""
    ask = "Write person number {} as JSON, with a name, an age and a list of their pets."
    prompts = [CHAT.format(ask.format(i)) for i in range(3)]  # over one 16-token block
    params = _greedy(json=PERSON, max_tokens=60)
    expected = [o.outputs[0].text for o in smollm2_llm.generate(prompts, params)]
    small = LLM(
        "smollm2", block_size=4, kv_cache_memory=40 * 4 * 46080, max_model_len=110,
        weight_format="float",
    )  # fmt: skip
    got = [o.outputs[0].text for o in small.generate(prompts, params)]
    assert small.engine.scheduler.stats.num_preemptions > 0
    assert got == expected
    again = smollm2_llm.generate(prompts[:1], params)[0]
    assert again.metrics.num_cached_tokens > 0 and again.outputs[0].text == expected[0]


def test_gemma3_byte_fallback_vocabulary_follows_a_schema(gemma3_llm) -> None:
    """Gemma's SentencePiece vocabulary (byte fallback, 262k tokens) through the same bridge."""
    out = gemma3_llm.generate(["A person, as JSON:"], _greedy(json=PERSON, max_tokens=100))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop", completion.text
    jsonschema.validate(json.loads(completion.text), PERSON)
