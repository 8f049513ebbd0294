"""The engine loop: add requests, step (schedule -> run -> update -> sample), stream outputs."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch

from kvlm.adapters.registry import PrefixAdapters
from kvlm.engine.config import DEFAULT_MAX_MODEL_LEN, EngineConfig, EngineConfigError
from kvlm.engine.observers import EngineObserver, Observers, RequestEvent, block_tables
from kvlm.engine.offload import OffloadConnector
from kvlm.engine.parallel_sampling import ParallelSampling, sequence_params
from kvlm.engine.press import apply_press, why_no_press
from kvlm.engine.request import OutputAccumulator, Request, RequestOutput
from kvlm.engine.runner import ModelRunner, PromptRows
from kvlm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig, SchedulerStats
from kvlm.engine.speculative import SpeculativeDecoder, SpeculativeStats
from kvlm.engine.weight_format import resolve_weight_format
from kvlm.kv.block_pool import OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.fingerprint import CacheIdentity
from kvlm.kv.memory import KVMemoryError, split_budget
from kvlm.kv.offload.spec import make_tiers, parse_offload
from kvlm.kv.pinned import VirtualPrefix
from kvlm.kv.quant import fp8_supported
from kvlm.kv.spec import KVCacheSpec, layer_groups
from kvlm.kv.store import KVStore
from kvlm.kv.transfer import BlockTransfer
from kvlm.loading import load_model, resolve_model_path
from kvlm.models.transformer import CausalLM
from kvlm.sampling import Logprob, Sampler, SamplingParams, make_generator
from kvlm.sampling.sampler import gather_logprobs
from kvlm.sampling.structured import StructuredDecoder
from kvlm.sampling.structured_grammar import StructuredOutputsError
from kvlm.sizes import parse_bytes
from kvlm.tokenizer import IncrementalDetokenizer, Tokenizer
from kvlm.tokenizer.llguidance_bridge import llguidance_tokenizer

logger = logging.getLogger(__name__)

# Takes the float32 logits rows [len(requests), vocab] of requests whose tokens it chooses
# itself (`LLMEngine.consume_rows`): one call per step, its requests in batch order.
RowConsumer = Callable[[list[Request], torch.Tensor], None]


class InputError(ValueError):
    """A request the engine refuses, with the value and the limit in the message."""


class PressRefusedError(InputError):
    """The request's `kv_press` cannot run on this engine or on this prompt."""


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        kv_format = self._kv_format()  # refused before the (slow) load when unsupported
        path = resolve_model_path(config.model)  # once: an alias may hash a large file
        self.model_path = path
        # "auto" resolved once, here: `self.config` names the format that runs (logs, JSON).
        weight_format = resolve_weight_format(config.weight_format, path, self.device, config.dtype)
        self.config = config = replace(config, weight_format=weight_format)
        loaded = load_model(str(path), config.torch_dtype, config.weight_format)
        self.model_config = loaded.config
        self.tokenizer = load_tokenizer(path)
        self.model = CausalLM(loaded).to_device(self.device).eval()
        self.max_model_len = config.max_model_len or min(
            DEFAULT_MAX_MODEL_LEN, self.model_config.max_model_len
        )
        if self.max_model_len > self.model_config.max_model_len:
            raise EngineConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context of "
                f"{self.model_config.max_model_len}"
            )
        self.kv_specs = layer_groups(
            self.model_config,
            config.block_size,
            kv_format,
            config.sliding_window,
            config.attention_sinks,
        )
        # With sinks in every group, rope positions are places in the cache: no length limit.
        self.unbounded_length = all(spec.positions_in_cache for spec in self.kv_specs)
        self.kv_stores: list[KVStore] | None = None
        self.kv_cache: KVCacheManager | None = None
        self.transfer: BlockTransfer | None = None  # blocks in and out (sessions, offload)
        self.offload: OffloadConnector | None = None
        if config.use_cache:
            self._make_cache()
        self.prefix_adapters: PrefixAdapters | None = None
        if config.prefix_adapters:
            self._register_prefix_adapters()
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.use_cache),
            self.kv_cache,
        )
        if config.kv_offload and self.transfer is not None:
            tiers = make_tiers(parse_offload(config.kv_offload))
            self.offload = OffloadConnector(tiers, self.cache_identity, self.transfer)
            self.scheduler.offload = self.offload
        self.runner = ModelRunner(
            self.model, self.device, self.kv_specs, self.kv_stores, self.kv_cache
        )
        reason = self.runner.use_fused_decode() if config.fused_decode else "fused_decode=False"
        if reason is not None:  # said once, here: no step falls back without a word
            logger.info("decode steps run layer by layer, not fused: %s", reason)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0  # forward passes run
        self._observers = Observers()
        self._row_consumers: dict[str, RowConsumer] = {}  # per request id, see consume_rows
        self.parallel = ParallelSampling()  # requests with n > 1 or best_of
        torch.manual_seed(config.seed)
        self.stop_token_ids = frozenset(self.tokenizer.stop_token_ids) | frozenset(
            self.model_config.eos_token_ids
        )
        self.sampler = Sampler(self.stop_token_ids)  # banned before a request's min_tokens
        self.speculative: SpeculativeDecoder | None = None
        if config.speculative is not None:
            self.speculative = SpeculativeDecoder(config.speculative, self.sampler)
        vocab_size = self.model_config.vocab_size  # structured outputs: built on first use
        # (a partial, not a closure over self: that cycle kept a deleted engine's memory
        # until the garbage collector happened to run)
        self.structured = StructuredDecoder(
            functools.partial(
                llguidance_tokenizer, self.tokenizer, vocab_size, self.stop_token_ids
            ),
            vocab_size,
        )

    def _kv_format(self) -> str:
        name = self.config.kv_cache_dtype
        if name == "auto":
            return self.config.dtype
        if name == "fp8" and not fp8_supported(self.device):
            raise EngineConfigError(
                f"kv_cache_dtype fp8 needs float8_e4m3fn, which torch {torch.__version__} "
                f"lacks on {self.device}: use int8 instead"
            )
        return name

    def _make_cache(self) -> None:
        """Pools and stores sized by `split_budget` (kv/memory.py: the calculator's rule)."""
        cfg = self.config
        budget = parse_bytes(cfg.kv_cache_memory)
        try:
            split = split_budget(
                self.kv_specs, budget, self.max_model_len, cfg.max_num_batched_tokens
            )
        except KVMemoryError as e:
            raise EngineConfigError(str(e)) from e
        self.kv_stores = [
            KVStore(spec, n, cfg.torch_dtype, self.device)
            for spec, n in zip(self.kv_specs, split.num_blocks, strict=True)
        ]
        self.kv_cache = KVCacheManager(self.kv_specs, split.num_blocks, cfg.enable_prefix_caching)
        if cfg.enable_prefix_caching:
            self.transfer = BlockTransfer(self.kv_cache, self.kv_stores)

    @cached_property
    def cache_identity(self) -> CacheIdentity:
        """What this engine's K/V bytes depend on (hashes the model file once, when asked)."""
        return CacheIdentity.of(
            self.model_path,
            self.config.dtype,
            self.config.weight_format,
            self.tokenizer.content_hash(),
            self.kv_specs,
        )

    def close(self) -> None:
        """Finish the offload tiers' queued writes and stop their threads (if any)."""
        if self.offload is not None:
            self.offload.close()
        self.structured.close()

    def _register_prefix_adapters(self) -> None:
        """Compute each prefix-tuning adapter's K/V once, into pinned blocks."""
        assert self.kv_cache is not None and self.kv_stores is not None  # the config checks
        self.prefix_adapters = PrefixAdapters(
            self.kv_cache, self.kv_stores, self.model_config, self.config.torch_dtype, self.device
        )
        for name, path in self.config.prefix_adapters:
            try:
                self.prefix_adapters.register(name, path)
            except OutOfBlocksError as e:
                raise EngineConfigError(
                    f"prefix adapter {name!r} does not fit the KV pool: {e}; raise kv_cache_memory"
                ) from e

    # --- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | None,
        prompt_token_ids: Sequence[int] | None,
        params: SamplingParams,
        cache_salt: str | None = None,
        request_id: str | None = None,
        prefix_adapter: str | None = None,
        continuation_start: int | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids when given); returns its request id.
        With `prefix_adapter`, the sequence starts with that adapter's virtual tokens. With
        `continuation_start` (`LLM.score_continuations`), the prompt's tokens from there on are
        a continuation: a press runs before it, prompt_logprobs score its tokens only."""
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt)
        virtual_prefix = self._virtual_prefix(prefix_adapter)
        num_virtual = 0 if virtual_prefix is None else virtual_prefix.num_tokens
        token_ids = self._check_prompt(list(prompt_token_ids), num_virtual)
        request_id = request_id or str(next(self._ids))
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        user_params, num_sequences = params, params.num_sequences
        if num_sequences > 1:
            if params.structured_outputs is not None:
                raise InputError("n or best_of above 1 cannot be combined with structured_outputs")
            params = sequence_params(params, 0)  # the request is sequence 0 of the group
        if params.kv_press is not None:
            reason = why_no_press(self, params.kv_press, continuation_start or len(token_ids))
            if reason is not None:
                raise PressRefusedError(f"kv_press {params.kv_press.method!r}: {reason}")
        grammar = None
        if params.structured_outputs is not None:
            try:
                grammar = self.structured.start(params.structured_outputs)
            except StructuredOutputsError as e:
                raise InputError(f"structured_outputs: {e}") from e
        request = Request(
            request_id=request_id,
            prompt=prompt,
            token_ids=token_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            generator=make_generator(params.seed, self.device),
            cache_salt=cache_salt,
            virtual_prefix=virtual_prefix,
            grammar=grammar,
            continuation_start=continuation_start,
        )
        self.requests[request_id] = request
        if num_sequences > 1:
            self.parallel.add(request, user_params)
        self.scheduler.add(request)
        if self._observers:
            self._observers.request(RequestEvent("added", request))
        return request_id

    def _virtual_prefix(self, prefix_adapter: str | None) -> VirtualPrefix | None:
        if prefix_adapter is None:
            return None
        known = self.prefix_adapters.names if self.prefix_adapters is not None else []
        prefix = None if self.prefix_adapters is None else self.prefix_adapters.get(prefix_adapter)
        if prefix is None:
            raise InputError(
                f"unknown prefix adapter {prefix_adapter!r}; this engine has "
                f"{', '.join(map(repr, known)) or 'none'} (load adapters with prefix_adapters=)"
            )
        return prefix

    def _check_prompt(self, token_ids: list[int], num_virtual: int = 0) -> list[int]:
        if not token_ids:
            raise InputError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)]
        bad += [t for t in token_ids if isinstance(t, int) and not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt token ids must be ints in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) + num_virtual >= self.max_model_len:
            virtual = f" after the prefix adapter's {num_virtual}" if num_virtual else ""
            raise InputError(
                f"prompt has {len(token_ids):,} tokens{virtual}; the context is "
                f"{self.max_model_len:,} (and at least one token must be generated): shorten "
                "it or raise max_model_len"
            )
        return token_ids

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (a client went away); with n > 1, all
        its sequences."""
        for sequence_id in self.parallel.remove(request_id):
            self.abort(sequence_id)
        request = self.requests.pop(request_id, None)
        self._row_consumers.pop(request_id, None)
        if request is not None and not request.finished:
            request.finish_reason = "abort"
            self.scheduler.finish(request)
            if self._observers:
                self._observers.request(RequestEvent("aborted", request))

    def consume_rows(self, request_id: str, consumer: RowConsumer) -> None:
        """From now on the request's logits rows go to `consumer`, not the sampler: it picks
        the request's tokens itself (`append_token`), as beam search does; its forks too."""
        if request_id not in self.requests:
            raise KeyError(f"no request {request_id!r} in this engine")
        self._row_consumers[request_id] = consumer

    def fork_request(self, parent_id: str) -> str:
        """A new running request continuing `parent_id`'s tokens under its parameters (its
        generator seeded alike): it holds every block of the parent by reference, so nothing
        is computed again, and a shared partial block is copied on its first write. Returns
        the new request's id."""
        parent = self.requests[parent_id]
        if parent.grammar is not None:
            raise InputError(
                f"request {parent_id} follows structured outputs: its grammar cannot be forked"
            )
        child = Request(
            request_id=str(next(self._ids)),
            prompt=parent.prompt,
            token_ids=list(parent.prompt_token_ids),
            params=parent.params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, parent.params.skip_special_tokens),
            generator=make_generator(parent.params.seed, self.device),
            cache_salt=parent.cache_salt,
            virtual_prefix=parent.virtual_prefix,
        )
        for token_id in parent.output_token_ids:  # the text so far, as the parent has it
            child.token_ids.append(token_id)
            child.append_text(child.detokenizer.push(token_id), check_stop=False)
        child.metrics.num_generated_tokens = parent.metrics.num_generated_tokens
        self.requests[child.request_id] = child
        self.scheduler.fork(parent, child)
        if parent_id in self._row_consumers:
            self._row_consumers[child.request_id] = self._row_consumers[parent_id]
        if self._observers:
            self._observers.request(RequestEvent("added", child))
        return child.request_id

    def append_token(self, request_id: str, token_id: int) -> None:
        """Extend a request whose tokens its consumer chooses by `token_id`, exactly as if
        the sampler had picked it (stop rules and limits apply)."""
        self._append_token(self.requests[request_id], token_id, None, time.perf_counter())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_to_completion(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        """Step until every one of `request_ids` finished; their whole outputs, in that order.
        If stepping fails, the ones not yet finished are aborted."""
        outputs = {request_id: OutputAccumulator() for request_id in request_ids}
        num_finished = 0
        try:
            while num_finished < len(outputs):
                for delta in self.step():
                    if delta.request_id in outputs:
                        outputs[delta.request_id].add(delta)
                        num_finished += delta.finished
        finally:
            for request_id, accumulated in outputs.items():
                if accumulated.last is None or not accumulated.last.finished:
                    self.abort(request_id)
        return [outputs[request_id].build() for request_id in request_ids]

    def running_requests(self) -> list[Request]:
        """The requests in the batch, oldest first (each holds blocks with a cache)."""
        return list(self.scheduler.running)

    def waiting_requests(self) -> list[Request]:
        """Requests queued for admission (new or preempted; not those fetching a prefix)."""
        return list(self.scheduler.waiting)

    @property
    def scheduler_stats(self) -> SchedulerStats:
        """Prefix-cache look-ups and hits and preemptions since start (live counters)."""
        return self.scheduler.stats

    # --- observers ------------------------------------------------------------------------

    def add_observer(self, observer: EngineObserver) -> None:
        """Have `observer` hear this engine's request and step events (engine thread)."""
        self._observers.add(observer)
        self.scheduler.notify = self._observers.request

    def remove_observer(self, observer: EngineObserver) -> None:
        self._observers.remove(observer)
        if not self._observers:  # no event is built with nobody listening
            self.scheduler.notify = None

    # --- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; returns outputs of requests that changed."""
        if self.speculative is not None:
            max_len = None if self.unbounded_length else self.max_model_len
            self.speculative.propose(self.scheduler.running, max_len)
        batch = self.scheduler.schedule()
        if not batch.requests:
            if self.scheduler.waiting:
                raise RuntimeError("no request could be scheduled: the KV pool is too small")
            if self.offload is not None and self.scheduler.loading:
                self.offload.wait_for_load(timeout=0.05)  # nothing else to run meanwhile
            return []
        self.num_steps += 1
        if self.kv_cache is not None and self.parallel.groups:
            self.parallel.note_kv(self.kv_cache)
        self.structured.before_forward()  # no spare core: the masks are done before it starts
        if batch.scores_prompt:
            logits, sampled, prompt_rows = self.runner.run_scoring(batch)
            self._score_prompts(batch, prompt_rows)
        else:
            logits, sampled = self.runner.run(batch)
        forward = None
        if self._observers:  # the K/V are written; no window has freed a block yet
            forward = self._observers.forward(
                self.num_steps, batch.requests, batch.num_new_tokens, self.kv_cache
            )
        self.scheduler.update_after_step(batch)
        for request in batch.requests:  # requests that reached their press compress now
            if request.press_pending and request.num_computed_tokens == request.press_at:
                assert self.kv_cache is not None and self.kv_stores is not None
                apply_press(request, self.kv_cache, self.kv_stores)
                request.metrics.kv_pressed_bytes = self.kv_cache.bytes_held(request.request_id)
        tables_after = None if forward is None else block_tables(forward.scheduled, self.kv_cache)
        changed: list[Request] = []
        requests = [batch.requests[i] for i in sampled]
        if self.parallel.groups and requests:  # n > 1: prompts just computed fork here
            logits, requests = self.parallel.fork_prompts(logits, requests, self._fork_sequence)
        if self._row_consumers and requests:
            logits, requests = self._hand_out_rows(logits, requests)
        if self.speculative is not None and requests:
            logits, requests = self._accept_drafts(logits, requests, changed)
        if requests:
            out = self.sampler(
                logits,
                [r.params for r in requests],
                [r.generator for r in requests],
                [r.past_token_ids for r in requests],
                [r.num_output_tokens for r in requests],
                self.structured.masks([r.grammar for r in requests]),
            )
            now = time.perf_counter()
            for request, token_id, logprobs in zip(
                requests, out.token_ids, out.logprobs, strict=True
            ):
                self._append_token(request, token_id, logprobs, now)
                changed.append(request)
            # Next masks, computed while this step's outputs go out and the next one runs.
            self.structured.prefetch([r.grammar for r in requests if r.grammar and not r.finished])
        outputs = [r.to_output() for r in changed]
        for request in changed:
            if request.finished:
                self.requests.pop(request.request_id, None)
        if forward is not None and tables_after is not None:
            self._observers.step(forward, tables_after, outputs)
        if self.parallel.groups:
            outputs = self.parallel.merge(outputs)
        return outputs

    def _fork_sequence(self, parent: Request, params: SamplingParams) -> Request:
        """Another sequence of `parent`'s request: a fork under its own parameters (seed)."""
        child = self.requests[self.fork_request(parent.request_id)]
        child.params = params
        child.generator = make_generator(params.seed, self.device)
        return child

    def _accept_drafts(
        self, logits: torch.Tensor, requests: list[Request], changed: list[Request]
    ) -> tuple[torch.Tensor, list[Request]]:
        """Verify the drafted requests' rows, roll their caches back to the verified tokens
        and append what they keep (up to a stop); returns the other requests and their rows."""
        assert self.speculative is not None
        verified = self.speculative.verify(logits, requests)
        now = time.perf_counter()
        for request, token_ids, logprobs in verified.accepted:
            self.scheduler.roll_back(request, len(request.token_ids) + len(token_ids) - 1)
            for token_id, entry in zip(token_ids, logprobs, strict=True):
                self._append_token(request, token_id, entry, now)
                if request.finished:  # EOS, a stop or max_tokens inside the accepted run
                    break
            changed.append(request)
        return verified.logits, verified.plain

    @property
    def speculative_stats(self) -> SpeculativeStats | None:
        """Drafts proposed and accepted, tokens per step (live counters); None without
        speculative decoding."""
        return None if self.speculative is None else self.speculative.stats

    def _hand_out_rows(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[torch.Tensor, list[Request]]:
        """Give each row consumer the rows of its requests; returns the rows and requests left
        for the sampler (with drafts, a request has 1 + len(spec_token_ids) rows)."""
        kept_rows: list[int] = []
        kept: list[Request] = []
        taken: dict[int, tuple[RowConsumer, list[Request], list[int]]] = {}
        row = 0
        for request in requests:
            num_rows = 1 + len(request.spec_token_ids)
            consumer = self._row_consumers.get(request.request_id)
            if consumer is None:
                kept_rows += range(row, row + num_rows)
                kept.append(request)
            else:
                assert num_rows == 1, "a request whose tokens a consumer chooses has no drafts"
                _, mine, rows = taken.setdefault(id(consumer), (consumer, [], []))
                mine.append(request)
                rows.append(row)
            row += num_rows
        for consumer, mine, rows in taken.values():
            consumer(mine, logits[rows])
        return logits[kept_rows], kept

    def _score_prompts(self, batch: ScheduledBatch, rows: PromptRows) -> None:
        """Append to each scoring request the entries of the prompt rows just computed: the
        log-probability of the token after each row, with its `prompt_logprobs` alternatives."""
        if not rows.spans:
            return
        requests = [batch.requests[i] for i, _, _ in rows.spans]
        targets, num_top = [], []
        for request, (_, first, num_rows) in zip(requests, rows.spans, strict=True):
            targets += request.token_ids[first + 1 : first + 1 + num_rows]
            num_top += [request.params.prompt_logprobs] * num_rows
        device = rows.logits.device
        entries = gather_logprobs(rows.logits, torch.tensor(targets, device=device), num_top)
        for entry in entries:
            assert entry is not None  # every row asked
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.id_to_token(tid)
        start = 0
        for request, (_, _, num_rows) in zip(requests, rows.spans, strict=True):
            assert request.prompt_logprobs is not None
            request.prompt_logprobs += entries[start : start + num_rows]
            request.num_prompt_logprobs += num_rows
            start += num_rows

    def _append_token(
        self, request: Request, token_id: int, logprobs: dict[int, Logprob] | None, now: float
    ) -> None:
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.token_ids.append(token_id)
        request.metrics.num_generated_tokens += 1
        if logprobs is not None:
            for tid, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.id_to_token(tid)
            request.logprobs.append(logprobs)
        params = request.params
        stop_match = request.append_text(request.detokenizer.push(token_id))
        is_eos = not params.ignore_eos and token_id in self.stop_token_ids
        grammar = request.grammar
        complete = grammar is not None and self.structured.advance(grammar, token_id)
        out_of_room = not self.unbounded_length and len(request.token_ids) >= self.max_model_len
        if params.max_tokens is not None:
            out_of_room |= request.num_output_tokens >= params.max_tokens
        if is_eos or token_id in params.stop_token_ids:
            self._finish(request, "stop", token_id, now)
        elif stop_match is not None:  # append_text already cut the text
            self._finish(request, "stop", stop_match.stop, now)
        elif complete:  # the grammar allows nothing more: no need to sample its EOS
            self._finish(request, "stop", None, now)
        elif out_of_room:
            self._finish(request, "length", None, now)

    def _finish(
        self, request: Request, reason: str, stop_reason: int | str | None, now: float
    ) -> None:
        if not isinstance(stop_reason, str):  # a stop string already cut the text
            request.append_text(request.detokenizer.flush(), check_stop=False)
        request.finish_reason = reason
        self._row_consumers.pop(request.request_id, None)
        request.stop_reason = stop_reason
        request.metrics.finish_time = now
        self.scheduler.finish(request)
        if self._observers:
            self._observers.request(RequestEvent("finished", request))

    def kv_cache_bytes_used(self) -> int:
        """Bytes of the blocks some request (or pin) holds, all groups, scales included."""
        return 0 if self.kv_cache is None else sum(self.kv_cache.bytes_used())

    def kv_group_usage(self) -> tuple[tuple[str, int, int], ...]:
        """Per layer group: a label, the bytes held and the bytes of all its usable blocks."""
        if self.kv_cache is None:
            return ()
        used, total = self.kv_cache.bytes_used(), self.kv_cache.bytes_total()
        return tuple(
            (_label(spec), held, size)
            for spec, held, size in zip(self.kv_specs, used, total, strict=True)
        )

    def kv_cache_bytes_total(self) -> int:
        """Bytes of every store's usable blocks (the null blocks left out)."""
        return 0 if self.kv_cache is None else sum(self.kv_cache.bytes_total())


def _label(spec: KVCacheSpec) -> str:
    """E.g. "15 layers, window 512 + 4 sinks, int8"."""
    window = "full" if spec.window is None else f"window {spec.window}"
    if spec.num_sinks:
        window += f" + {spec.num_sinks} sinks"
    return f"{spec.num_layers} layers, {window}, {spec.kv_format}"
