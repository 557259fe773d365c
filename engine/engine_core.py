"""The engine's core (as vLLM v1's `EngineCore`): the step thread, the one lock, the live request
streams, the counters, and the failure policy.

Threads: callers live on an asyncio loop; the model step runs on the one background thread started
here, so the loop keeps accepting requests while the model computes. Shared state (scheduler, block
manager, adapter pool, sequences, the streams) is touched only under `lock`; the forward pass itself
runs without it. Outputs go back to each request's loop with `call_soon_threadsafe` (RequestStream.put).

Every way a request ends (finished, aborted, timed out, its adapter failed to load, its step failed,
its logits went non-finite, the step thread died) goes through `_finish` or `_loop`'s last resort, so
what it held is freed once and its caller always hears back. The client-facing API and admission are
engine/engine.py.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from engine.config import EngineConfig
from engine.engine_parts import EngineParts
from engine.errors import (
    EngineDeadError,
    EngineError,
    NonFiniteOutputError,
    OverloadedError,
    QueueTimeoutError,
    RequestTimeoutError,
)
from engine.model_runner import StepResult
from engine.output_processor import RequestStream, TokenStep
from engine.scheduler import ScheduledBatch
from engine.sequence import SeqStatus, Sequence
from engine.stats import EngineCounters

log = logging.getLogger("engine")


class EngineCore:
    """Owns the step loop and the state it shares with callers; starts its thread when built."""

    def __init__(self, config: EngineConfig, parts: EngineParts, wake: threading.Event) -> None:
        self.config = config
        self.scheduler, self.runner, self.pool = parts.scheduler, parts.runner, parts.pool
        self.output_processor = parts.output_processor
        # The one lock over scheduler, block manager, adapter pool, sequences, streams and counters:
        # the step loop holds it around scheduling and post-processing, Engine for admission and snapshots.
        self.lock = threading.Lock()
        self.counters = EngineCounters()
        self._wake = wake  # set by new requests, aborts, adapter loads (the pool's on_ready)
        self._streams: dict[str, RequestStream] = {}
        self._pending_aborts: set[str] = set()
        self._stop = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    # ---- what Engine calls --------------------------------------------------------------------
    def is_alive(self) -> bool:
        """False once the step thread has died or the core was shut down."""
        return self._dead is None and not self._stop and self._thread.is_alive()

    def raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine step loop died: {self._dead!r}")

    def wake(self) -> None:
        self._wake.set()

    def in_use(self, request_id: str) -> bool:
        """Whether a live request has this id (lock-free: a dict membership test)."""
        return request_id in self._streams

    def check_bounds(self, adapter_id: str | None) -> None:
        """Raise OverloadedError (counted as rejected) when the queues are full; caller holds `lock`."""
        try:
            self.scheduler.check_bounds(adapter_id)
        except OverloadedError:
            self.counters.rejected += 1
            raise

    def add_request(self, seq: Sequence, stream: RequestStream) -> None:
        """Queue a request. The caller holds `lock`, has just checked the bounds, and wakes the loop after."""
        self.scheduler.add(seq)
        self._streams[seq.request_id] = stream

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks and slot. False if it is unknown or done."""
        with self.lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.done:
                return False
            if stream.seq.status is SeqStatus.WAITING:
                self._finish(stream, "aborted")
            else:
                self._pending_aborts.add(request_id)
        self._wake.set()
        return True

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the step loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_steps()
        except BaseException as exc:  # a bug outside the model step: fail loudly, never hang callers
            log.exception("engine step loop died")
            self._dead = exc
            with self.lock:
                for stream in list(self._streams.values()):
                    if not stream.done:
                        stream.done = True
                        stream.put(EngineDeadError(f"engine step loop died: {exc!r}"))
                self._streams.clear()

    def _run_steps(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            with self.lock:
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
                with self.lock:
                    self._fail_batch(batch, exc)
                continue
            with self.lock:
                self._postprocess(batch, sampled)

    def _live_stream(self, seq: Sequence) -> RequestStream | None:
        stream = self._streams.get(seq.request_id)
        return stream if stream is not None and not stream.done else None

    def _fail_adapter_loads(self) -> None:
        for adapter_id, error in self.pool.take_failures():
            for seq in list(self.scheduler.queues.get(adapter_id, ())):
                if (stream := self._live_stream(seq)) is not None:
                    self.counters.failed += 1
                    self._finish(stream, "error", error=error)

    def _expire_deadlines(self) -> None:
        """Fail requests past max_queue_wait_s (no first token yet) or request_timeout_s; frees their blocks and slots."""
        cfg = self.config
        in_queue, past_timeout = self.scheduler.overdue(time.monotonic(), cfg.max_queue_wait_s, cfg.request_timeout_s)
        for seq in in_queue:
            if (stream := self._live_stream(seq)) is not None:
                self.counters.queue_timeouts += 1
                error = QueueTimeoutError(
                    f"no capacity for the request within max_queue_wait_s={cfg.max_queue_wait_s:g} s; retry later"
                )
                self._finish(stream, "error", error=error)
        for seq in past_timeout:
            if (stream := self._live_stream(seq)) is not None:
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
            if (stream := self._live_stream(s.seq)) is not None:
                self.counters.failed += 1
                self._finish(stream, "error", error=EngineError(f"generation failed: {exc}"))

    def _postprocess(self, batch: ScheduledBatch, step: StepResult) -> None:
        self.counters.record_step(
            len(batch.prefills) + len(batch.decodes), batch.num_tokens,
            sum(s.num_tokens for s in batch.prefills), len(batch.decodes),
        )
        for s in batch.prefills + batch.decodes:
            s.seq.num_computed += s.num_tokens
        for seq in step.nonfinite:
            if (stream := self._live_stream(seq)) is not None:
                self._fail_nonfinite(stream)
        now = time.monotonic()
        for st in step.sampled:
            if (stream := self._live_stream(st.seq)) is None:
                continue
            seq = stream.seq
            if seq.grammar is not None and not seq.grammar.accept(st.token_id):  # the mask makes this unreachable
                self.counters.failed += 1
                self._finish(stream, "error", error=EngineError("the sampled token does not fit the request's grammar"))
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            token = self.output_processor.add_token(stream, st.token_id, st.logprob, st.top)
            if token.finish_reason is not None:
                self._finish(stream, token.finish_reason, token)
            else:
                stream.put(self.output_processor.delta(stream, token))
        self._apply_aborts()

    def _fail_nonfinite(self, stream: RequestStream) -> None:
        """Stop a request whose logits came out NaN/Inf; its batch-mates are untouched (see attention.py)."""
        adapter_id = stream.seq.adapter_id
        self.counters.record_nonfinite(adapter_id)
        error = NonFiniteOutputError(adapter_id)
        log.warning("request %s: %s", stream.seq.request_id, error)
        self._finish(stream, "error", error=error)

    def _finish(
        self, stream: RequestStream, reason: str, last: TokenStep | None = None, error: EngineError | None = None
    ) -> None:
        """End a request (under the lock): free what it holds, then send its error or its final output."""
        self.scheduler.remove(stream.seq, cache_blocks=error is None)  # a failed request's last blocks are not reused
        stream.done = True
        self._streams.pop(stream.seq.request_id, None)
        if error is not None:
            stream.put(error)
            return
        if reason == "aborted":
            self.counters.aborted += 1
        else:
            self.counters.finished += 1
        stream.put(self.output_processor.final(stream, reason, last))
