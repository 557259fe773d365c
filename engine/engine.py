"""The Engine: one base model, many adapters, requests for all of them decoded in the same batch.

Threads: callers live on an asyncio loop; the model step runs on one background thread so the loop
keeps accepting requests while the model computes. Shared state (scheduler, block manager, adapter
pool, sequences) is touched only under `_lock`; the forward pass itself runs without it. Outputs go
back to each request's loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from engine.adapter_config import served_base_names
from engine.adapter_pool import AdapterPool
from engine.attention import KVCache
from engine.block_manager import BlockManager
from engine.config import AdapterSpec, EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import (
    AdapterBusyError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    NonFiniteOutputError,
    OverloadedError,
    QueueTimeoutError,
    RequestTimeoutError,
)
from engine.fair_share import FairShare
from engine.grammar import GrammarCompiler
from engine.hub import resolve_local_dir
from engine.model_arch import ModelArch
from engine.model_loader import dummy_causal_lm, load_causal_lm
from engine.model_runner import ModelRunner, SampledToken, StepResult
from engine.outputs import RequestOutput, TokenInfo
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import SeqStatus, Sequence
from kernels.lora_ops import LoraOps

log = logging.getLogger("engine")

MAX_MODEL_LEN_DEFAULT_CAP = 8192
# Distinct adapters counted by name in `nonfinite_by_adapter` (a metric label each); the rest share one.
NONFINITE_ADAPTERS_NAMED = 256
NONFINITE_OTHER_ADAPTERS = "__other__"


@dataclass
class _Stream:
    """Where a request's outputs go: an asyncio queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    detok: IncrementalDetokenizer
    seq: Sequence
    tokens_sent: int = 0
    done: bool = False
    prefill_sent: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def put(self, item: RequestOutput | BaseException) -> None:
        # A closed loop means the caller is gone: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class EngineCounters:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    rejected: int = 0  # refused at submit by a waiting bound (OverloadedError)
    queue_timeouts: int = 0  # no first token within max_queue_wait_s (QueueTimeoutError)
    request_timeouts: int = 0  # stopped at request_timeout_s (RequestTimeoutError)
    nonfinite_by_adapter: dict[str, int] = field(default_factory=dict)  # "" = base model
    last_batch_seqs: int = 0
    last_batch_tokens: int = 0
    max_batch_seqs: int = 0
    batch_seqs_hist: dict[int, int] = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.model_dir = resolve_local_dir(config.model, config.revision, config.hub_cache_dir)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.arch = ModelArch.from_hf_config(hf_config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.dtype = config.torch_dtype
        self.device = config.device
        if config.load_format == "dummy":
            self.model = dummy_causal_lm(self.arch, self.dtype, self.device, config.seed)
        else:
            self.model = load_causal_lm(self.model_dir, self.arch, self.dtype, self.device)
        self.eos_token_ids = self._eos_ids(hf_config)
        self._special_ids = frozenset(self.tokenizer.all_special_ids)  # the property rebuilds a list per call
        # Structured output: compiled per distinct grammar (cached), in a child process started on first use.
        self.grammars = GrammarCompiler(self.tokenizer, self.arch.vocab_size, sorted(self.eos_token_ids))

        bytes_per_block = KVCache.bytes_per_block(
            self.arch.num_layers, config.block_size, self.arch.num_kv_heads, self.arch.head_dim, self.dtype
        )
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // bytes_per_block)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv = KVCache(
            self.arch.num_layers, num_blocks, config.block_size, self.arch.num_kv_heads, self.arch.head_dim,
            self.dtype, self.device,
        )
        model_len = config.max_model_len or min(self.arch.max_position_embeddings, MAX_MODEL_LEN_DEFAULT_CAP)
        # A request must fit the cache on its own, or preemption could never make room for it.
        self.max_model_len = min(model_len, self.blocks.capacity_tokens)
        self._wake = threading.Event()
        self.pool = AdapterPool(
            self.arch,
            config.max_adapter_slots,
            config.max_lora_rank,
            self.dtype,
            self.device,
            host_cache_bytes=config.host_cache_bytes,
            hub_cache_dir=config.hub_cache_dir,
            allow_dynamic=config.allow_dynamic_adapters,
            local_roots=config.adapter_source_roots,
            failure_ttl_s=config.adapter_failure_ttl_s,
            on_ready=self._wake.set,
            load_timeout_s=config.adapter_load_timeout_s,
            base_model_names=served_base_names(config.model, self.model_dir),
        )
        for spec in config.adapters:
            self.pool.register(spec, load_now=config.preload_adapters)
        self.scheduler = Scheduler(
            self.blocks, self.pool, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
            policy=config.scheduling_policy,
            fair_share=FairShare(config.adapter_weights, config.prefill_token_cost, config.decode_token_cost),
            max_waiting_per_adapter=config.max_waiting_per_adapter,
            waiting_slack=config.waiting_slack,
            under_share_prefill_first=config.under_share_prefill_first,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
        )
        self.runner = ModelRunner(self.model, self.kv, self.blocks, self.pool.slots, LoraOps(config.lora_backend), self.device)
        self.counters = EngineCounters()
        self._streams: dict[str, _Stream] = {}
        self._pending_aborts: set[str] = set()
        self._lock = threading.Lock()
        self._stop = False
        self._dead: BaseException | None = None
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    # ---- setup helpers ------------------------------------------------------------------------
    def _eos_ids(self, hf_config: Any) -> set[int]:
        ids: set[int] = set()
        for source in (hf_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        gen_path = self.model_dir / "generation_config.json"
        if gen_path.is_file():
            import json

            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(i) for i in eos)
        return ids

    @property
    def model_id(self) -> str:
        return self.config.model

    def adapter_ids(self) -> list[str]:
        return self.pool.ids()

    def has_adapter(self, adapter_id: str) -> bool:
        """O(1): whether the adapter is registered (any tier)."""
        return self.pool.known(adapter_id)

    def is_alive(self) -> bool:
        """False once the step thread has died or the engine was shut down (health checks)."""
        return self._dead is None and not self._stop and self._thread.is_alive()

    def adapter_info(self) -> list[dict[str, Any]]:
        """Every registered adapter: id, source, rank, targets, bytes, tier (disk/host/device), usage."""
        return self.pool.describe()

    def load_adapter(self, spec: AdapterSpec, preload: bool = True) -> dict[str, Any]:
        """Register (or re-register) an adapter; with preload, read and validate it now."""
        if self.pool.known(spec.adapter_id):  # same id again: new source and/or changed files
            self.pool.register(spec, load_now=False)
            record = self.pool.reload(spec.adapter_id)
        else:
            record = self.pool.register(spec, load_now=preload)
        self._wake.set()
        return {"id": spec.adapter_id, "tier": self.pool.tier(spec.adapter_id), "bytes": record.nbytes}

    def reload_adapter(self, adapter_id: str) -> dict[str, Any]:
        record = self.pool.reload(adapter_id)
        return {"id": adapter_id, "tier": self.pool.tier(adapter_id), "bytes": record.nbytes}

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter. Refused with AdapterBusyError while requests for it run or wait."""
        with self._lock:
            waiting = len(self.scheduler.queues.get(adapter_id, ()))
            if waiting:
                raise AdapterBusyError(adapter_id, f"{waiting} requests are waiting for it")
            self.pool.unload(adapter_id)

    # kept for callers of the first API
    def add_adapter(self, spec: AdapterSpec) -> None:
        self.load_adapter(spec)

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("inputs", "must not be empty")
            return list(self.tokenizer.encode(prompt))
        if not prompt:
            raise InvalidRequestError("inputs", "must not be empty")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
        if bad:
            raise InvalidRequestError("inputs", f"token ids must be integers in [0, {self.arch.vocab_size}), got {bad[:5]}")
        return list(prompt)

    def _make_sequence(
        self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None, request_id: str | None,
        truncate: int | None,
    ) -> Sequence:
        params.validate(self.config.max_new_tokens_limit)
        if adapter_id is not None:
            self.pool.check_known(adapter_id)
        with self._lock:  # refuse a flood before tokenizing it: a 429 must cost next to nothing
            self._check_bounds(adapter_id)
        ids = self.tokenize(prompt)
        if truncate is not None:
            if truncate < 1:
                raise InvalidRequestError("truncate", f"must be >= 1, got {truncate}")
            ids = ids[-truncate:]
        if len(ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequestError(
                "inputs",
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_model_len}. "
                f"Given: {len(ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`",
            )
        seed = params.seed
        generator = None
        if not params.greedy:
            if seed is None:
                seed = self._rng.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed % 2**63)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._streams:
            raise InvalidRequestError("request_id", f"{rid!r} is already in use")
        seq = Sequence(rid, adapter_id, ids, params, time.monotonic(), seed=seed, generator=generator)
        if params.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        return seq

    def _check_bounds(self, adapter_id: str | None) -> None:
        try:
            self.scheduler.check_bounds(adapter_id)
        except OverloadedError:
            self.counters.rejected += 1
            raise

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        truncate: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; the last one has `finished=True`.

        Raises InvalidRequestError / UnknownAdapterError / OverloadedError (with `retry_after_s`)
        before anything is queued; the stream raises QueueTimeoutError (no first token within
        max_queue_wait_s) or RequestTimeoutError (past request_timeout_s), everything it held freed.
        Closing the iterator early (a client went away) aborts the request and frees its KV blocks.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine step loop died: {self._dead!r}")
        params = params or SamplingParams()
        seq = self._make_sequence(prompt, params, adapter_id, request_id, truncate)
        if params.grammar is not None:  # compiled here, in a worker thread of the caller's loop: never a step
            seq.grammar = await asyncio.to_thread(self.grammars.matcher, params.grammar)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.stop, params.include_stop_str_in_output)
        stream = _Stream(asyncio.get_running_loop(), queue, detok, seq)
        with self._lock:
            self._check_bounds(adapter_id)  # again: the queue may have filled while the prompt was tokenized
            self.scheduler.add(seq)
            self._streams[seq.request_id] = stream
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq.request_id)

    async def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        truncate: int | None = None,
    ) -> RequestOutput:
        """Run one request to the end and return its final output (with every token's details)."""
        tokens: list[TokenInfo] = []
        top: list[tuple[TokenInfo, ...]] = []
        prefill: tuple[TokenInfo, ...] = ()
        async for out in self.generate(prompt, params, adapter_id, request_id, truncate):
            tokens.extend(out.tokens)
            top.extend(out.top_tokens)
            prefill = out.prefill or prefill
            if out.finished:
                return replace(out, tokens=tuple(tokens), top_tokens=tuple(top), prefill=prefill)
        raise EngineDeadError("stream ended without a final output")

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks and slot. False if it is unknown or done."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.done:
                return False
            if stream.seq.status is SeqStatus.WAITING:
                self._finish(stream, "aborted")
            else:
                self._pending_aborts.add(request_id)
        self._wake.set()
        return True

    # ---- the step loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_steps()
        except BaseException as exc:  # a bug outside the model step: fail loudly, never hang callers
            log.exception("engine step loop died")
            self._dead = exc
            with self._lock:
                for stream in list(self._streams.values()):
                    if not stream.done:
                        stream.done = True
                        stream.put(EngineDeadError(f"engine step loop died: {exc!r}"))
                self._streams.clear()

    def _run_steps(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            with self._lock:
                self._apply_aborts()
                self._fail_adapter_loads()
                self._expire_deadlines()
                batch = self.scheduler.schedule() if self.scheduler.has_work() else None
                if batch is not None:
                    self.counters.preemptions += len(batch.preempted)
            if batch is None or batch.empty:
                # Nothing runnable (idle, or every waiting adapter is still loading): the pool's
                # on_ready and every new request set _wake.
                self._wake.wait(timeout=0.5 if batch is None else 0.05)
                self._wake.clear()
                continue
            try:
                sampled = self.runner.run(batch)
            except Exception as exc:  # a failed step fails its requests, never the engine
                log.exception("model step failed")
                with self._lock:
                    self._fail_batch(batch, exc)
                continue
            with self._lock:
                self._postprocess(batch, sampled)

    def _fail_adapter_loads(self) -> None:
        for adapter_id, error in self.pool.take_failures():
            for seq in list(self.scheduler.queues.get(adapter_id, ())):
                stream = self._streams.get(seq.request_id)
                if stream is not None and not stream.done:
                    self.counters.failed += 1
                    self._finish(stream, "error", error=error)

    def _expire_deadlines(self) -> None:
        """Fail requests past max_queue_wait_s (no first token yet) or request_timeout_s; frees their blocks and slots."""
        cfg = self.config
        in_queue, past_timeout = self.scheduler.overdue(time.monotonic(), cfg.max_queue_wait_s, cfg.request_timeout_s)
        for seq in in_queue:
            stream = self._streams.get(seq.request_id)
            if stream is not None and not stream.done:
                self.counters.queue_timeouts += 1
                error = QueueTimeoutError(
                    f"no capacity for the request within max_queue_wait_s={cfg.max_queue_wait_s:g} s; retry later"
                )
                self._finish(stream, "error", error=error)
        for seq in past_timeout:
            stream = self._streams.get(seq.request_id)
            if stream is not None and not stream.done:
                self.counters.request_timeouts += 1
                error = RequestTimeoutError(
                    f"the request ran past request_timeout_s={cfg.request_timeout_s:g} s after "
                    f"{len(seq.output_ids)} generated tokens and was stopped"
                )
                self._finish(stream, "error", error=error)

    def _apply_aborts(self) -> None:
        for rid in self._pending_aborts:
            stream = self._streams.get(rid)
            if stream is not None and not stream.done:
                self._finish(stream, "aborted")
        self._pending_aborts.clear()

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> None:
        for s in batch.prefills + batch.decodes:
            stream = self._streams.get(s.seq.request_id)
            if stream is not None and not stream.done:
                self.counters.failed += 1
                self._finish(stream, "error", error=EngineError(f"generation failed: {exc}"))

    def _postprocess(self, batch: ScheduledBatch, step: StepResult) -> None:
        c = self.counters
        c.steps += 1
        c.last_batch_seqs = len(batch.prefills) + len(batch.decodes)
        c.last_batch_tokens = batch.num_tokens
        c.max_batch_seqs = max(c.max_batch_seqs, c.last_batch_seqs)
        c.batch_seqs_hist[c.last_batch_seqs] = c.batch_seqs_hist.get(c.last_batch_seqs, 0) + 1
        c.prefill_tokens += sum(s.num_tokens for s in batch.prefills)
        c.decode_tokens += len(batch.decodes)
        for s in batch.prefills + batch.decodes:
            s.seq.num_computed += s.num_tokens
        for seq in step.nonfinite:
            stream = self._streams.get(seq.request_id)
            if stream is not None and not stream.done:
                self._fail_nonfinite(stream)
        now = time.monotonic()
        for st in step.sampled:
            stream = self._streams.get(st.seq.request_id)
            if stream is None or stream.done:
                continue
            self._append_token(stream, st, now)
        self._apply_aborts()

    def _fail_nonfinite(self, stream: _Stream) -> None:
        """Stop a request whose logits came out NaN/Inf; its batch-mates are untouched (see attention.py)."""
        adapter_id = stream.seq.adapter_id
        counts = self.counters.nonfinite_by_adapter
        key = adapter_id or ""
        if key not in counts and len(counts) >= NONFINITE_ADAPTERS_NAMED:
            key = NONFINITE_OTHER_ADAPTERS
        counts[key] = counts.get(key, 0) + 1
        self.counters.failed += 1
        error = NonFiniteOutputError(adapter_id)
        log.warning("request %s: %s", stream.seq.request_id, error)
        self._finish(stream, "error", error=error)

    def _token_info(self, token_id: int, logprob: float | None) -> TokenInfo:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return TokenInfo(token_id, text, logprob, token_id in self._special_ids)

    def _append_token(self, stream: _Stream, st: SampledToken, now: float) -> None:
        seq, params = stream.seq, stream.seq.params
        if seq.grammar is not None and not seq.grammar.accept(st.token_id):  # the mask makes this unreachable
            self.counters.failed += 1
            self._finish(stream, "error", error=EngineError("the sampled token does not fit the request's grammar"))
            return
        seq.output_ids.append(st.token_id)
        seq.output_logprobs.append(st.logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason: str | None = None
        is_eos = st.token_id in self.eos_token_ids and not params.ignore_eos
        if not is_eos:
            stream.detok.add(st.token_id)
        if is_eos:
            reason = "eos_token"
        elif stream.detok.stopped_by is not None:
            reason = "stop_sequence"
        elif len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        token = self._token_info(st.token_id, st.logprob)
        top = tuple(self._token_info(t, lp) for t, lp in st.top) if params.top_n_tokens else ()
        if reason is not None:
            self._finish(stream, reason, last_token=token, last_top=top)
            return
        stream.put(
            RequestOutput(
                request_id=seq.request_id,
                text=stream.detok.take(final=False),
                tokens=(token,),
                top_tokens=(top,) if top else (),
                prefill=self._prefill_once(stream),
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=len(seq.output_ids),
                adapter_id=seq.adapter_id,
                token_ids=(st.token_id,),
            )
        )

    def _prefill_once(self, stream: _Stream) -> tuple[TokenInfo, ...]:
        seq = stream.seq
        if stream.prefill_sent or not seq.params.prompt_logprobs:
            return ()
        stream.prefill_sent = True
        lps = seq.prompt_logprobs + [None] * (len(seq.prompt_ids) - len(seq.prompt_logprobs))
        return tuple(self._token_info(t, lp) for t, lp in zip(seq.prompt_ids, lps))

    def _finish(
        self,
        stream: _Stream,
        reason: str,
        last_token: TokenInfo | None = None,
        last_top: tuple[TokenInfo, ...] = (),
        error: EngineError | None = None,
    ) -> None:
        seq = stream.seq
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        stream.done = True
        self._streams.pop(seq.request_id, None)
        if error is not None:
            stream.put(error)
            return
        if reason == "aborted":
            self.counters.aborted += 1
        else:
            self.counters.finished += 1
        stream.detok.finish()
        stream.put(
            RequestOutput(
                request_id=seq.request_id,
                text=stream.detok.take(final=True),
                tokens=(last_token,) if last_token else (),
                top_tokens=(last_top,) if last_top else (),
                prefill=self._prefill_once(stream),
                finished=True,
                finish_reason=reason,
                generated_text=stream.detok.text,
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=len(seq.output_ids),
                seed=seq.seed,
                adapter_id=seq.adapter_id,
                token_ids=tuple(seq.output_ids),
            )
        )

    # ---- introspection ------------------------------------------------------------------------
    def check_adapter_source(self, source: str) -> None:
        """Raise unless `source` is a Hub id or resolves under this engine's adapter_source_roots."""
        self.pool.check_source(source)

    def oldest_waiting_age_s(self) -> float:
        """Age of the oldest request still waiting for admission (0 when none); lock-free."""
        arrival = self.scheduler.oldest_arrival()
        return 0.0 if arrival is None else max(0.0, time.monotonic() - arrival)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            running: dict[str, int] = {}
            for seq in self.scheduler.running:
                key = seq.adapter_id or ""
                running[key] = running.get(key, 0) + 1
            waiting = {(k or ""): len(q) for k, q in self.scheduler.queues.items()}
            c = self.counters
            return {
                "running": running,
                "waiting": waiting,
                "num_running": len(self.scheduler.running),
                "num_waiting": self.scheduler.num_waiting,
                "kv_blocks_total": self.blocks.num_blocks,
                "kv_blocks_used": self.blocks.num_used,
                "kv_blocks_free": self.blocks.num_free,
                "adapter_slots": self.pool.slots.num_slots,
                "adapter_slots_pinned": self.pool.pinned_slots(),
                "steps": c.steps,
                "last_batch_seqs": c.last_batch_seqs,
                "last_batch_tokens": c.last_batch_tokens,
                "max_batch_seqs": c.max_batch_seqs,
                "batch_seqs_hist": dict(c.batch_seqs_hist),
                "prefill_tokens": c.prefill_tokens,
                "decode_tokens": c.decode_tokens,
                "preemptions": c.preemptions,
                "finished": c.finished,
                "aborted": c.aborted,
                "failed": c.failed,
                "rejected": c.rejected,
                "queue_timeouts": c.queue_timeouts,
                "request_timeouts": c.request_timeouts,
                "scheduling_policy": self.scheduler.policy,
                "prefill_first_steps": self.scheduler.prefill_first_steps,
                # per adapter ("" = base): weight, VTC counter, tokens served, admissions, rejections,
                # timeouts, queue waits (sum and max over admitted requests)
                "fairness": self.scheduler.fair.snapshot(),
                "nonfinite_by_adapter": dict(c.nonfinite_by_adapter),
                "grammars": self.grammars.stats(),  # compiled-grammar cache: entries, bytes, compiles, hits
                "adapters": self.pool.stats(),
            }

    def check_idle_invariants(self) -> None:
        """For tests: with no request in flight every KV block is free and no adapter slot is pinned."""
        with self._lock:
            self.blocks.check_invariants()
            assert self.blocks.num_used == 0, f"{self.blocks.num_used} KV blocks still in use"
            assert self.pool.pinned_slots() == 0, f"pins left: {self.pool.slots.pins}"
            assert not self.scheduler.running and self.scheduler.num_waiting == 0

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.grammars.close()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
