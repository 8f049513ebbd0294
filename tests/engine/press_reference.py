"""What a press test holds the engine to: the prompt's K/V as its prefill stored them, and one
no-cache forward whose mask shows the continuation only the tokens a press kept (the layers'
own windows applied, as the model's local layers have them)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kvlm import LLM, KVPress, SamplingParams
from kvlm.attention.context import ForwardContext, GroupView
from kvlm.kv.block_hash import extend_block_hashes
from tests.models.conftest import record_steps


def plain_kv(
    llm: LLM, prompt: list[int], group: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of cache group `group` [n, H, hd] keys and values: the prompt's as its prefill
    stored them, read from the blocks that still name it (a press swaps named blocks for fresh
    ones, so they keep them)."""
    engine = llm.engine
    block_size = engine.kv_specs[group].block_size
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompt, len(prompt), block_size, None)
    hit = engine.kv_cache.find_cached_prefix(hashes, len(prompt) + 1)
    assert hit.num_tokens == len(prompt)
    store = engine.kv_stores[group]
    rows = torch.tensor(
        [
            hit.blocks[group][i // block_size].block_id * store.rows_per_block + i % block_size
            for i in range(len(prompt))
        ]
    )
    return [store.gather(layer, rows) for layer in store.spec.layer_ids]


def masked_reference(
    llm: LLM,
    prompt: list[int],
    continuation: list[int],
    kept: Sequence[torch.Tensor | None] | None,
    recorder: QueryRecorder | None = None,
) -> torch.Tensor:
    """[len(continuation)] log-probabilities from one no-cache forward of prompt +
    continuation in which the continuation's rows see, of the prompt, only each layer and KV
    head's `kept` [H, keep] tokens (None, or None for a layer: every token); every row is
    causal, and in a layer with a window sees only the window's keys. A `recorder` hears every
    layer's queries."""
    model, config = llm.engine.model, llm.engine.model_config
    tokens = prompt + continuation
    n, total = len(prompt), len(tokens)
    groups = config.num_heads // config.num_kv_heads
    place = torch.arange(total)
    causal = place[None, :] <= place[:, None]  # [T, T]
    window_of = {layer: s.window for s in llm.engine.kv_specs for layer in s.layer_ids}
    views = []
    for layer in range(config.num_layers):
        allowed = causal
        if window_of[layer] is not None:
            allowed = causal & (place[None, :] > place[:, None] - window_of[layer])
        mask = allowed.expand(config.num_heads, total, total).clone()  # [nh, T, T]
        if kept is not None and kept[layer] is not None:
            seen = torch.zeros(config.num_kv_heads, n, dtype=torch.bool)
            seen.scatter_(1, kept[layer], True)
            mask[:, n:, :n] &= seen.repeat_interleave(groups, dim=0)[:, None, :]
        views.append(
            GroupView(None, None, gather_index=torch.arange(total), num_keys=total, mask=mask[None])
        )
    ctx = ForwardContext(
        positions=torch.arange(total),
        num_seqs=1,
        max_query_len=total,
        query_pad_index=torch.arange(total),
        layer_views=views,
        query_capture=recorder,  # type: ignore[arg-type]
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), ctx)
        logits = model.logits(hidden[n - 1 : total - 1]).log_softmax(dim=-1)
    return logits.gather(1, torch.tensor(continuation)[:, None])[:, 0]


class QueryRecorder:
    """Stands where attention() hands a press its queries: keeps every row, before rope."""

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}  # layer -> [T, nh, hd]
        self.ropes: dict[int, torch.nn.Module] = {}
        self.scales: set[float] = set()

    def add(self, layer_idx: int, q: torch.Tensor, rope: torch.nn.Module, scale: float) -> None:
        self.queries[layer_idx], self.ropes[layer_idx] = q.clone(), rope
        self.scales.add(scale)


def fused_against_layered(
    model: str, engine_args: dict, prompt: list[int], press: KVPress, max_tokens: int
) -> torch.Tensor:
    """[max_tokens] |logprob| differences between a pressed greedy request on the fused plan,
    whose every decode step must run as one plan call and no torch layer, and the same tokens
    scored after the same press layer by layer (one engine alive at a time)."""
    fused = LLM(model, fused_decode=True, **engine_args)
    assert fused.engine.runner.fused is not None
    request = {"prompt_token_ids": prompt}
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, kv_press=press, logprobs=1
    )
    with pytest.MonkeyPatch.context() as patch, record_steps(fused.engine.model, patch) as steps:
        [output] = fused.generate(request, params)
    assert output.metrics.kv_pressed_bytes is not None
    decode = [s for s in steps if s.query_lens == [1]]
    assert len(decode) == max_tokens - 1
    assert all((s.fused, s.torch_layers) == (1, 0) for s in decode)
    generated = output.outputs[0].token_ids
    logprobs = zip(output.outputs[0].logprobs, generated, strict=True)
    got = torch.tensor([lp[t].logprob for lp, t in logprobs])  # [max_tokens] sampled tokens
    del fused
    layer_by_layer = LLM(model, fused_decode=False, **engine_args)
    [score] = layer_by_layer.score_continuations(request, generated, SamplingParams(kv_press=press))
    return (got - torch.tensor(score.logprobs)).abs()
