"""A long-context retrieval task made at run time: facts hidden in a haystack of Python docs.

Key-value facts ("The access code of the blue archive is 48213.") are inserted at chosen depths
into text from CPython's `pydoc_data.topics`, so nothing is downloaded; after the context, one
question per fact ends in a cue ("Answer: The access code of the blue archive is") whose
continuation is the value. A press that drops the fact's K/V loses the answer.

Scores per fact: exact match of the greedy answer (its tokens, as many as the answer has) and
the answer's log-likelihood. The module is stdlib only and deterministic by seed; token counts come
from a `tokenize` callable handed in, so kvlm and the kvpress anchor (another virtual
environment, `benchmarks/kvpress_anchor.py`, which imports this file by path) build the same
task with their own tokenizers.

A task is token ids, not text: the context is the concatenation of separately tokenized lines
(facts start lines of their own), cut to exactly `context_tokens`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Tokenize = Callable[[str], list[int]]  # text -> token ids, no special tokens

CHARS_PER_TOKEN_BOUND = 16  # a tokenizer needs at most this many characters per token
MIN_CONTEXT_TOKENS = 256
COLOURS = (
    "blue", "amber", "crimson", "silver", "green", "violet", "golden", "black",
    "white", "orange", "scarlet", "grey",
)  # fmt: skip
PLACES = (
    "archive", "lantern", "harbour", "library", "tower", "garden", "vault", "station",
    "bridge", "observatory", "workshop", "cellar",
)  # fmt: skip
ATTRIBUTES = (
    "access code", "room number", "serial number", "locker number", "ticket number",
    "account number", "badge number", "order number", "gate number", "case number",
    "phone extension", "batch number",
)  # fmt: skip
MAX_FACTS = len(COLOURS)  # facts share no attribute, colour or place: a small model mixes them


class HaystackError(ValueError):
    """A task setting out of range; the message names it and the limit."""


@dataclass(frozen=True)
class Fact:
    """One hidden fact: `statement` sits in the context, `question` and `answer` follow it."""

    attribute: str  # "access code"
    key: str  # "blue archive"
    value: str  # "48213"

    @property
    def statement(self) -> str:
        return f"The {self.attribute} of the {self.key} is {self.value}.\n"

    @property
    def question(self) -> str:
        return (
            f"\nQuestion: What is the {self.attribute} of the {self.key}?\n"
            f"Answer: The {self.attribute} of the {self.key} is"
        )

    @property
    def answer(self) -> str:
        return f" {self.value}"


@dataclass(frozen=True)
class PlacedFact:
    """A fact as placed: its first token's index in the context and that index / context."""

    fact: Fact
    token_index: int
    depth: float  # token_index / context_tokens
    question_ids: list[int]
    answer_ids: list[int]


@dataclass(frozen=True)
class HaystackConfig:
    context_tokens: int = 4096
    num_facts: int = 4
    seed: int = 0
    depths: tuple[float, ...] | None = None  # None: evenly spread, (i + 0.5) / num_facts

    def __post_init__(self) -> None:
        if self.context_tokens < MIN_CONTEXT_TOKENS:
            raise HaystackError(
                f"context_tokens must be >= {MIN_CONTEXT_TOKENS}, got {self.context_tokens}"
            )
        if not 1 <= self.num_facts <= MAX_FACTS:
            raise HaystackError(f"num_facts must be in [1, {MAX_FACTS}], got {self.num_facts}")
        if self.depths is not None:
            if len(self.depths) != self.num_facts:
                raise HaystackError(
                    f"{len(self.depths)} depths for {self.num_facts} facts: give one per fact"
                )
            for depth in self.depths:
                if not 0 <= depth <= 1:
                    raise HaystackError(f"a depth must be in [0, 1], got {depth}")

    def fact_depths(self) -> tuple[float, ...]:
        if self.depths is not None:
            return self.depths
        return tuple((i + 0.5) / self.num_facts for i in range(self.num_facts))


@dataclass(frozen=True)
class HaystackTask:
    config: HaystackConfig
    context_ids: list[int]  # exactly config.context_tokens ids, BOS included
    facts: list[PlacedFact] = field(default_factory=list)


def make_facts(num_facts: int, rng: random.Random) -> list[Fact]:
    """Facts with no attribute, colour or place in common, and distinct 5-digit values."""
    attributes = rng.sample(ATTRIBUTES, num_facts)
    keys = [
        f"{c} {p}"
        for c, p in zip(rng.sample(COLOURS, num_facts), rng.sample(PLACES, num_facts), strict=True)
    ]
    values = rng.sample(range(10_000, 100_000), num_facts)
    return [Fact(a, k, str(v)) for a, k, v in zip(attributes, keys, values, strict=True)]


def reference_text(first_topic: int = 0) -> str:
    """English prose and code from the Python reference, shipped with CPython: every topic in
    name order from topic `first_topic` on (then round again), blank-line separated. Also the
    default text of `kvlm eval ppl`."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    start = first_topic % len(names)
    return "\n\n".join(topics[name] for name in names[start:] + names[:start])


def filler_lines(rng: random.Random) -> list[str]:
    """Every non-blank line of the Python reference topics, from a seeded topic on."""
    from pydoc_data.topics import topics

    text = reference_text(rng.randrange(len(topics)))
    return [line for line in text.splitlines(keepends=True) if line.strip()]


def make_task(
    config: HaystackConfig, tokenize: Tokenize, bos_ids: Sequence[int] = ()
) -> HaystackTask:
    """Build the context ids, facts at the line boundaries nearest their asked depths."""
    rng = random.Random(config.seed)
    facts = make_facts(config.num_facts, rng)
    fact_ids = [tokenize(f.statement) for f in facts]
    filler_budget = config.context_tokens - len(bos_ids) - sum(map(len, fact_ids))
    if filler_budget < config.context_tokens // 2:
        raise HaystackError(
            f"{config.num_facts} facts take {sum(map(len, fact_ids))} of "
            f"{config.context_tokens} tokens: use fewer facts or a longer context"
        )
    lines: list[list[int]] = []
    total = 0
    for line in filler_lines(rng):
        if total >= filler_budget:
            break
        lines.append(tokenize(line))
        total += len(lines[-1])
    if total < filler_budget:
        raise HaystackError(f"the docs hold {total:,} tokens; ask for fewer context tokens")
    lines[-1] = lines[-1][: len(lines[-1]) - (total - filler_budget)]  # exactly the budget
    total = filler_budget
    starts = [0]  # starts[i]: filler tokens before line i
    for ids in lines:
        starts.append(starts[-1] + len(ids))
    # a fact goes at the line boundary (starts[j]: before line j) nearest its depth
    depths = config.fact_depths()
    order = sorted(range(len(facts)), key=lambda i: depths[i])
    boundary = {
        i: min(range(len(starts)), key=lambda j: abs(starts[j] - depths[i] * total)) for i in order
    }
    context = list(bos_ids)
    placed: dict[int, int] = {}
    for j in range(len(starts)):
        for i in order:
            if boundary[i] == j:
                placed[i] = len(context)
                context.extend(fact_ids[i])
        if j < len(lines):
            context.extend(lines[j])
    assert len(context) == config.context_tokens, (len(context), config.context_tokens)
    return HaystackTask(
        config,
        context,
        [
            PlacedFact(
                fact,
                placed[i],
                placed[i] / config.context_tokens,
                tokenize(fact.question),
                tokenize(fact.answer),
            )
            for i, fact in enumerate(facts)
        ],
    )


def scoring_split(
    task: HaystackTask, placed: PlacedFact, question_aware: bool
) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) for one fact: the press compresses the prompt's cache,
    the continuation is read through it and ends with the answer's ids.

    Question-agnostic (kvpress's pipeline): the prompt is the context alone and the question
    follows it. Question-aware: the question ends the prompt, so a press's observation window
    (SnapKV's) sees it."""
    if question_aware:
        return task.context_ids + placed.question_ids, list(placed.answer_ids)
    return list(task.context_ids), placed.question_ids + placed.answer_ids


@dataclass(frozen=True)
class AnswerScore:
    """What a backend measured for one answer: log p of each of its tokens after the pressed
    prompt, and whether greedy decoding gives exactly its tokens (equivalently: each answer
    token is the likeliest given the ones before it)."""

    logprobs: list[float]
    exact: bool


def score_task(task: HaystackTask, answers: Sequence[AnswerScore]) -> dict[str, object]:
    """The task's scores as one JSON-ready dict: means over facts, and each fact's own."""
    if len(answers) != len(task.facts):
        raise HaystackError(f"{len(answers)} answer scores for {len(task.facts)} facts")
    per_fact = []
    for placed, answer in zip(task.facts, answers, strict=True):
        if len(answer.logprobs) != len(placed.answer_ids):
            raise HaystackError(
                f"fact {placed.fact.value}: {len(answer.logprobs)} logprobs for "
                f"{len(placed.answer_ids)} answer tokens"
            )
        per_fact.append(
            {
                "value": placed.fact.value,
                "depth": round(placed.depth, 4),
                "exact": answer.exact,
                "logprob": sum(answer.logprobs),
            }
        )
    num_tokens = sum(len(p.answer_ids) for p in task.facts)
    total_logprob = sum(f["logprob"] for f in per_fact)
    return {
        "exact_match": sum(f["exact"] for f in per_fact) / len(per_fact),
        "answer_logprob": total_logprob / len(per_fact),  # mean over facts of the sum
        "answer_token_perplexity": math.exp(-total_logprob / num_tokens),
        "context_tokens": task.config.context_tokens,
        "num_facts": task.config.num_facts,
        "seed": task.config.seed,
        "facts": per_fact,
    }
