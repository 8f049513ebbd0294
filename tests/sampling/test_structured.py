"""Structured outputs below the server: StructuredOutputsParams' checks, the grammar compiler's
refusals, masks against what llguidance's matcher accepts, RowMask touching constrained rows
only, and generation on SmolLM2 (each kind of constraint, a batch mixing constrained and
unconstrained requests, preemption, the prefix cache, max_tokens inside a value)."""

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
    banned = decoder.masks([None, grammar]).banned[0]  # [vocab]
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
    assert mask.rows == [0, 1] and not mask.banned[:, dash].any()
    assert mask.banned[:, letters].all()  # a letter before the dash breaks the regex


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


def test_row_mask_touches_constrained_rows_only() -> None:
    logits = torch.randn(3, 8)
    before = logits.clone()
    banned = torch.zeros(1, 8, dtype=torch.bool)
    banned[0, 2:] = True
    RowMask([1], banned).apply(logits)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.equal(logits[1, :2], before[1, :2]) and torch.isinf(logits[1, 2:]).all()
    # Runs of consecutive rows ([0], [2, 3], [5]) each take their own rows of the mask.
    logits = torch.randn(6, 8)
    before = logits.clone()
    banned = torch.rand(4, 8) < 0.5
    RowMask([0, 2, 3, 5], banned).apply(logits)
    expected = before.clone()
    expected[[0, 2, 3, 5]] = before[[0, 2, 3, 5]].masked_fill(banned, float("-inf"))
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="mask is"):
        RowMask([0, 1], banned).apply(logits)


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
