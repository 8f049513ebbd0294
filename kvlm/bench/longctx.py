"""kvlm's side of the long-context task (`kvlm eval longctx`): each fact's answer, after the
prompt's cache was pressed, scored by `LLM.score_continuations` (its log-likelihood) and
generated greedily (exact match).

The task and its scores are `haystack.py`'s, shared with the kvpress anchor. A pressed request
runs its press at `continuation_start` (the engine's seam for `score_continuations`), so a
question-agnostic answer is generated after the question was read through the compressed
context, as kvpress's pipeline does.
"""

from __future__ import annotations

from kvlm.bench.haystack import AnswerScore, HaystackConfig, HaystackTask, make_task, scoring_split
from kvlm.engine.llm import LLM
from kvlm.sampling import KVPress, SamplingParams


def build_task(llm: LLM, config: HaystackConfig) -> HaystackTask:
    """The task in this model's tokens (BOS first where the tokenizer adds one)."""
    tokenizer = llm.get_tokenizer()
    return make_task(
        config,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        tokenizer.encode("", add_special_tokens=True),
    )


def greedy_answers(
    llm: LLM, task: HaystackTask, kv_press: KVPress | None, question_aware: bool
) -> list[list[int]]:
    """Per fact, the tokens greedy decoding gives after its prompt (pressed) and question, as
    many as the answer has (fewer if it stops); all facts run as one batch."""
    engine = llm.engine
    request_ids = []
    try:
        for placed in task.facts:
            prompt, continuation = scoring_split(task, placed, question_aware)
            question = continuation[: len(continuation) - len(placed.answer_ids)]
            params = SamplingParams(
                max_tokens=len(placed.answer_ids), temperature=0, kv_press=kv_press
            )
            start = len(prompt) if question else None  # press the prompt, then read the question
            request_ids.append(
                engine.add_request(None, prompt + question, params, continuation_start=start)
            )
        outputs = dict(zip(request_ids, engine.run_to_completion(request_ids), strict=True))
    finally:
        for request_id in request_ids:
            engine.abort(request_id)  # a no-op once it finished
    return [outputs[request_id].outputs[0].token_ids for request_id in request_ids]


def answer_scores(
    llm: LLM, task: HaystackTask, kv_press: KVPress | None, question_aware: bool
) -> list[AnswerScore]:
    """Per fact: the answer tokens' log p, read after the prompt was pressed, and whether greedy
    decoding gives exactly the answer."""
    splits = [scoring_split(task, placed, question_aware) for placed in task.facts]
    scored = llm.score_continuations(
        [{"prompt_token_ids": prompt} for prompt, _ in splits],
        [continuation for _, continuation in splits],
        SamplingParams(kv_press=kv_press),
    )
    generated = greedy_answers(llm, task, kv_press, question_aware)
    return [
        AnswerScore(score.logprobs[-len(placed.answer_ids) :], tokens == placed.answer_ids)
        for placed, score, tokens in zip(task.facts, scored, generated, strict=True)
    ]
