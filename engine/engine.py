"""The Engine: one base model, many adapters, requests for all of them decoded in the same batch.

Here: the client-facing API (requests, adapters, stats) and admission (validation, tokenizing, queue
bounds), called from the callers' asyncio loops. The step thread, the one lock over the shared state
and the failure policy are engine/engine_core.py; the parts are built by engine/engine_parts.py,
tokens become outputs in engine/output_processor.py, and what `stats()` returns is engine/stats.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from engine.config import AdapterSpec, EngineConfig
from engine.engine_core import EngineCore
from engine.engine_parts import build_engine_parts
from engine.errors import AdapterBusyError, InvalidRequestError
from engine.outputs import RequestOutput, final_output
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.stats import EngineStats


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        wake = threading.Event()  # the step loop's: the pool sets it when a background load finishes
        parts = build_engine_parts(config, on_adapter_ready=wake.set)
        self.model_dir, self.arch, self.tokenizer, self.model = parts.model_dir, parts.arch, parts.tokenizer, parts.model
        self.dtype, self.device = config.torch_dtype, config.device
        self.eos_token_ids, self.grammars, self.max_model_len = parts.eos_token_ids, parts.grammars, parts.max_model_len
        self.blocks, self.kv, self.pool = parts.blocks, parts.kv, parts.pool
        self.scheduler, self.runner, self.output_processor = parts.scheduler, parts.runner, parts.output_processor
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.engine_core = EngineCore(config, parts, wake)  # starts the step thread: built last
        self.counters = self.engine_core.counters  # the core's object (it counts under its lock), not a copy

    @property
    def model_id(self) -> str:
        return self.config.model

    def is_alive(self) -> bool:
        """False once the step thread has died or the engine was shut down (health checks)."""
        return self.engine_core.is_alive()

    # ---- adapters -----------------------------------------------------------------------------
    def has_adapter(self, adapter_id: str) -> bool:
        """O(1): whether the adapter is registered (any tier)."""
        return self.pool.known(adapter_id)

    def adapter_info(self) -> list[dict[str, Any]]:
        """The adapter listing: every registered adapter's id, source, rank, targets, bytes, tier
        (disk/host/device), whether it is loading, and its usage. Sources are for the admin API only."""
        return self.pool.describe()

    def check_adapter_source(self, source: str) -> None:
        """Raise PermissionError unless `source` is a Hub id or resolves under adapter_source_roots."""
        self.pool.check_source(source)

    def load_adapter(self, spec: AdapterSpec, preload: bool = True) -> dict[str, Any]:
        """Register (or re-register) an adapter; with preload, read and validate it now."""
        if self.pool.known(spec.adapter_id):  # same id again: new source and/or changed files
            self.pool.register(spec, load_now=False)
            record = self.pool.reload(spec.adapter_id)
        else:
            record = self.pool.register(spec, load_now=preload)
        self.engine_core.wake()
        return {"id": spec.adapter_id, "tier": self.pool.tier(spec.adapter_id), "bytes": record.nbytes}

    def reload_adapter(self, adapter_id: str) -> dict[str, Any]:
        record = self.pool.reload(adapter_id)
        return {"id": adapter_id, "tier": self.pool.tier(adapter_id), "bytes": record.nbytes}

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter. Refused with AdapterBusyError while requests for it run or wait."""
        with self.engine_core.lock:
            waiting = len(self.scheduler.queues.get(adapter_id, ()))
            if waiting:
                raise AdapterBusyError(adapter_id, f"{waiting} requests are waiting for it")
            self.pool.unload(adapter_id)

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], truncate: int | None = None) -> list[int]:
        """A prompt's token ids (see `tokenize_prompt`)."""
        return tokenize_prompt(self.tokenizer, self.arch.vocab_size, prompt, truncate)

    def _make_sequence(
        self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None, request_id: str | None,
        truncate: int | None,
    ) -> Sequence:
        params.validate(self.config.max_new_tokens_limit)
        if adapter_id is not None:
            self.pool.check_known(adapter_id)
        with self.engine_core.lock:  # refuse a flood before tokenizing it: a 429 must cost next to nothing
            self.engine_core.check_bounds(adapter_id)
        ids = self.tokenize(prompt, truncate)
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
        if self.engine_core.in_use(rid):
            raise InvalidRequestError("request_id", f"{rid!r} is already in use")
        seq = Sequence(rid, adapter_id, ids, params, time.monotonic(), seed=seed, generator=generator)
        if params.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        return seq

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
        self.engine_core.raise_if_dead()
        params = params or SamplingParams()
        seq = self._make_sequence(prompt, params, adapter_id, request_id, truncate)
        if params.grammar is not None:  # compiled here, in a worker thread of the caller's loop: never a step
            seq.grammar = await asyncio.to_thread(self.grammars.matcher, params.grammar)
        stream = self.output_processor.new_stream(seq)
        with self.engine_core.lock:
            # Again: the queue may have filled while the prompt was tokenized.
            self.engine_core.check_bounds(adapter_id)
            self.engine_core.add_request(seq, stream)
        self.engine_core.wake()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
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
        return await final_output(self.generate(prompt, params, adapter_id, request_id, truncate))

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks and slot. False if it is unknown or done."""
        return self.engine_core.abort(request_id)

    # ---- introspection ------------------------------------------------------------------------
    def oldest_waiting_age_s(self) -> float:
        """Age of the oldest request still waiting for admission (0 when none); lock-free."""
        arrival = self.scheduler.oldest_arrival()
        return 0.0 if arrival is None else max(0.0, time.monotonic() - arrival)

    def stats(self) -> EngineStats:
        """A consistent snapshot (taken under the lock) of load, KV blocks, adapter tiers and counters."""
        with self.engine_core.lock:
            running: dict[str, int] = {}
            for seq in self.scheduler.running:
                key = seq.adapter_id or ""
                running[key] = running.get(key, 0) + 1
            return EngineStats(
                **dataclasses.asdict(self.counters),  # copies: the counters go on changing
                running=running,
                waiting={(k or ""): len(q) for k, q in self.scheduler.queues.items()},
                num_running=len(self.scheduler.running),
                num_waiting=self.scheduler.num_waiting,
                kv_blocks_total=self.blocks.num_blocks,
                kv_blocks_used=self.blocks.num_used,
                kv_blocks_free=self.blocks.num_free,
                # queries / hits (tokens), cached and evictable blocks, evictions (engine/prefix_cache.py)
                prefix_cache=self.blocks.cache_stats().as_dict(),
                adapter_slots=self.pool.slots.num_slots,
                adapter_slots_pinned=self.pool.pinned_slots(),
                scheduling_policy=self.scheduler.policy,
                prefill_first_steps=self.scheduler.prefill_first_steps,
                fairness=self.scheduler.fair.snapshot(),
                grammars=self.grammars.stats(),
                adapters=self.pool.stats(),
                oldest_waiting_age_s=self.oldest_waiting_age_s(),
            )

    def check_idle_invariants(self) -> None:
        """For tests: with no request in flight every KV block is free and no adapter slot is pinned."""
        with self.engine_core.lock:
            self.blocks.check_invariants()
            assert self.blocks.num_used == 0, f"{self.blocks.num_used} KV blocks still in use"
            assert self.pool.pinned_slots() == 0, f"pins left: {self.pool.slots.pins}"
            assert not self.scheduler.running and self.scheduler.num_waiting == 0

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.grammars.close()
        self.engine_core.shutdown()


def tokenize_prompt(tokenizer: Any, vocab_size: int, prompt: str | list[int], truncate: int | None = None) -> list[int]:
    """A prompt's token ids (text is encoded, ids are checked against the vocabulary), keeping only
    the last `truncate` of them when given (TGI's `truncate`). Engine and EngineProcess both use it."""
    if not prompt:
        raise InvalidRequestError("inputs", "must not be empty")
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    else:
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError("inputs", f"token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
        ids = list(prompt)
    if truncate is not None:
        if truncate < 1:
            raise InvalidRequestError("truncate", f"must be >= 1, got {truncate}")
        ids = ids[-truncate:]
    return ids
