"""What a model replica does, without Ray: one Engine behind a dict-in / dict-out interface.

`ModelReplica` (serve_app/deployments.py) is a thin Ray Serve shell around `ReplicaCore`; the
in-process backend (serve_app/backends.py) uses the same class directly, so the HTTP layer, the
request mapping and the metrics are tested without starting Ray. Everything that crosses the
ingress/replica boundary is a plain dict (cheap to pickle, no engine classes needed on the ingress):
serve_app/engine_request.py in, serve_app/engine_output.py out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine import (
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    Engine,
    EngineConfig,
    EngineError,
    EngineProcess,
    EngineStats,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    merge_outputs,
)
from serve_app.engine_output import delta_dict, result_dict
from serve_app.engine_request import EngineRequest, check_prompt_size, prompt_chars
from serve_app.errors import error_info, status_label
from serve_app.metrics import ReplicaMetrics
from serve_app.replica_admin import run_admin_op
from serve_app.stats_keys import SNAPSHOT_ENGINE, SNAPSHOT_METRICS, SNAPSHOT_REPLICA

UNKNOWN_ADAPTER_LABEL = "__unknown__"  # metric label for ids we do not serve (keeps label cardinality bounded)
FINISHED_OK = ("length", "eos_token", "stop_sequence")
# Streaming chunks a replica sends per second, all streams together (0 = every token on its own).
# Each costs ~1-2 ms of CPU across replica, ingress and proxy; 50/s keeps that under a tenth of a
# core (measured on 2 CPU cores: loadtests/bench_serve.py). Raise it on machines with cores to spare.
DEFAULT_STREAM_MESSAGES_PER_S = 50.0
# The default prompt size limit in characters, before any tokenizing: max_model_len tokens times this.
# Tokenizers average 3-5 characters per token on text and code, so a prompt over the bound could not
# fit the context anyway; refusing it by its length costs nothing, tokenizing 4 MB first costs seconds.
CHARS_PER_TOKEN_BOUND = 8
# Prompts up to this many characters are tokenized on the event loop (well under a millisecond, less
# than a hop to a thread); longer ones in PREPARE_WORKERS worker threads, so that a big prompt delays
# its sender only. Fast tokenizers release the GIL while they run, and the workers run at a lower
# CPU priority (nice +PREPARE_NICE, Linux): when the cores are busy, the event loop and the engine's
# step thread go first and big prompts get what is left.
INLINE_PREPARE_CHARS = 1024
PREPARE_WORKERS = 2
PREPARE_NICE = 10


def _lower_thread_priority() -> None:
    """Initializer of the prepare workers. Linux sets priorities per thread; elsewhere this is a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)


class ReplicaCore:
    def __init__(self, config: EngineConfig, served_name: str, replica_id: str = "local",
                 stream_messages_per_s: float = DEFAULT_STREAM_MESSAGES_PER_S,
                 max_input_chars: int | None = None, engine_process: bool = False,
                 torch_threads: int | None = None) -> None:
        # In a process of its own (engine/engine_process.py) or on a thread of this one; the same methods.
        self.engine: Engine | EngineProcess = (EngineProcess(config, torch_threads=torch_threads) if engine_process
                                               else Engine(config))
        self.max_input_chars = max_input_chars or self.engine.max_model_len * CHARS_PER_TOKEN_BOUND
        self._prepare_pool = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="loraserve-prepare",
                                                initializer=_lower_thread_priority)
        self.stream_messages_per_s = stream_messages_per_s
        self._active_streams = 0
        self.config = config
        self.served_name = served_name
        self.replica_id = replica_id
        self.metrics = ReplicaMetrics()
        self.started = time.time()
        self._loads_seen = 0  # the pool's source_loads already put into metrics.adapter_load

    # ---- request preparation ------------------------------------------------------------------
    def resolve_adapter(self, adapter_id: str | None) -> str | None:
        """The engine adapter id for an API `model` / `adapter_id` value (None = base model)."""
        if adapter_id is None or adapter_id == "":
            return None
        if self.engine.has_adapter(adapter_id):
            return adapter_id
        if adapter_id == self.served_name:
            return None
        return adapter_id  # unknown: the engine answers UnknownAdapterError

    def _adapter_label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return ""
        return adapter_id if self.engine.has_adapter(adapter_id) else UNKNOWN_ADAPTER_LABEL

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        messages = req.get("messages")
        tokenizer = self.engine.tokenizer
        if messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidRequestError("messages", "this model has no chat template; use /v1/completions")
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template may raise on roles it does not support
                raise InvalidRequestError("messages", f"the chat template rejected the messages: {exc}") from exc
            # Templates carry their own special tokens (as transformers' apply_chat_template(tokenize=True)).
            return self.engine.tokenize(list(tokenizer.encode(text, add_special_tokens=False)), req.get("truncate"))
        prompt = req.get("prompt")
        if prompt is None:
            raise InvalidRequestError("inputs", "is required")
        return self.engine.tokenize(prompt, req.get("truncate"))

    def prepare(self, req: EngineRequest) -> tuple[list[int], SamplingParams, str | None]:
        """Token ids, sampling parameters and adapter of a request; raises InvalidRequestError."""
        adapter_id = self.resolve_adapter(req.get("adapter_id"))
        check_prompt_size(req, self.max_input_chars, self.engine.max_model_len)
        ids = self._prompt_ids(req)  # truncated (`truncate`) by the engine's tokenize
        kwargs = dict(req.get("params") or {})
        if "stop" in kwargs:
            kwargs["stop"] = tuple(kwargs["stop"])
        if kwargs.get("max_new_tokens") is None:
            room = self.engine.max_model_len - len(ids)
            if room < 1:
                raise InvalidRequestError(
                    "inputs", f"`inputs` must have less than {self.engine.max_model_len} tokens. Given: {len(ids)}"
                )
            default = req.get("default_max_new_tokens")
            kwargs["max_new_tokens"] = min(room, default or room, self.config.max_new_tokens_limit)
        try:
            params = SamplingParams(**kwargs)
        except TypeError as exc:  # an unknown field: a bug in the ingress, still reported cleanly
            raise InvalidRequestError("parameters", str(exc)) from exc
        return ids, params, adapter_id

    async def prepare_off_loop(self, req: EngineRequest) -> tuple[list[int], SamplingParams, str | None]:
        """`prepare`, in a worker thread unless the prompt is small (see INLINE_PREPARE_CHARS)."""
        if prompt_chars(req) <= INLINE_PREPARE_CHARS:
            return self.prepare(req)
        # The size check first, here: a prompt over the limit is refused without waiting for a worker.
        check_prompt_size(req, self.max_input_chars, self.engine.max_model_len)
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, self.prepare, req)

    # ---- running ------------------------------------------------------------------------------
    async def outputs(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, with its metrics recorded when it ends (any way)."""
        arrival = req.get("arrival") or time.time()
        label = self._adapter_label(self.resolve_adapter(req.get("adapter_id")))
        try:
            ids, params, adapter_id = await self.prepare_off_loop(req)
        except Exception as exc:
            self.metrics.record(label, status_label(error_info(exc)["kind"]) if isinstance(exc, EngineError)
                                else "error")
            raise
        status = "aborted"  # unless we see the end: cancelled (client gone) or closed early
        first: float | None = None
        last: float | None = None
        generated = 0
        try:
            async for out in self.engine.generate(ids, params, adapter_id=adapter_id,
                                                  request_id=req.get("request_id") or uuid.uuid4().hex):
                now = time.time()
                if out.tokens:
                    first = first or now
                    last = now
                generated = out.generated_tokens
                if out.finished:
                    status = "ok" if out.finish_reason in FINISHED_OK else "aborted"
                yield out
        except Exception as exc:
            status = status_label(error_info(exc)["kind"]) if isinstance(exc, EngineError) else "error"
            raise
        finally:
            end = time.time()
            tpot = (last - first) / (generated - 1) if first and last and generated > 1 else None
            ran = status in ("ok", "aborted")
            self.metrics.record(
                label, status, prompt_tokens=len(ids) if ran else 0, generated_tokens=generated,
                ttft=(first - arrival) if first else None, tpot=tpot,
                latency=(end - arrival) if status == "ok" else None,
            )

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        """Run to the end; the final result (or {"error": ErrorInfo})."""
        try:
            # Iterate to the end (the engine stops after the final output) so that `outputs`
            # records this request's metrics now, not when the generator is garbage-collected.
            final = merge_outputs([out async for out in self.outputs(req)])
        except Exception as exc:  # an unexpected one too: its text goes to the log, not to the client
            return {"error": error_info(exc, req.get("request_id"))}
        if final is None:
            return {"error": error_info(EngineError("the request ended without a result"))}
        return result_dict(final, details=bool(req.get("details")))

    async def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        """Deltas in chunks of one or more tokens. Errors arrive as a final {"error": ErrorInfo} item.

        Every chunk costs a message through Ray (replica -> ingress -> proxy), about as much CPU as
        decoding one token of a small model. So the replica keeps the total message rate under
        `stream_messages_per_s`: each stream may send one chunk per `active streams / rate` seconds
        and the deltas in between go out together (at 50/s a lone stream may send every 20 ms,
        a few tokens of a small model; 8 streams every 160 ms). With many concurrent streams each gets chunkier instead of the
        messaging eating the decode throughput. The first chunk (time to first token) and the last are never held back.
        Closing or cancelling this generator cancels the pump, which aborts the engine request.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        ended = loop.create_future()  # set when the final item is queued: flush it without waiting

        def put(item: RequestOutput | BaseException | None) -> None:
            queue.put_nowait(item)
            if (item is None or isinstance(item, BaseException) or item.finished) and not ended.done():
                ended.set_result(None)

        async def pump() -> None:
            try:
                async for out in self.outputs(req):
                    put(out)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                put(exc)
            else:
                put(None)

        task = loop.create_task(pump())
        self._active_streams += 1
        last_sent: float | None = None
        try:
            while True:
                items = [await queue.get()]
                if last_sent is not None and self.stream_messages_per_s > 0 and not ended.done():
                    wait = last_sent + self._active_streams / self.stream_messages_per_s - loop.time()
                    if wait > 0:
                        await asyncio.wait([ended], timeout=wait)  # collect deltas meanwhile
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunk: list[dict[str, Any]] = []
                done = False
                for item in items:
                    if item is None:
                        done = True
                    elif isinstance(item, BaseException):
                        chunk.append({"error": error_info(item, req.get("request_id"))})
                        done = True
                    else:
                        chunk.append(delta_dict(item))
                if chunk:
                    self.metrics.record_chunk(len(chunk))
                    yield chunk
                    last_sent = loop.time()
                if done:
                    return
        finally:
            self._active_streams -= 1
            if not task.done():
                task.cancel()
                # Let the cancellation run now (it aborts the request and frees its KV blocks).
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), timeout=5.0)

    # ---- introspection ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the public routes (/info, /v1/models) show: adapter ids, never their sources or the
        model's path (those are on the authenticated admin API only), and the request limits."""
        engine = self.engine
        return {
            "model_id": self.served_name,
            "model_dtype": self.config.dtype,
            "model_device_type": str(self.config.device).split(":")[0],
            "max_model_len": engine.max_model_len,
            "max_input_chars": self.max_input_chars,
            "max_new_tokens_limit": self.config.max_new_tokens_limit,
            "max_num_seqs": self.config.max_num_seqs,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "max_waiting": self.config.max_waiting,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_top_n_tokens": MAX_TOP_N_TOKENS,
            "max_adapter_slots": self.config.max_adapter_slots,
            "max_lora_rank": self.config.max_lora_rank,
            "block_size": self.config.block_size,
            "has_chat_template": bool(getattr(engine.tokenizer, "chat_template", None)),
            # base_model_mismatch: the adapter's config names another base model (it is still served);
            # which one, and where the adapter came from, only the admin API shows.
            "adapters": [{"id": a["id"], "base_model_mismatch": bool(a.get("base_model_mismatch", False))}
                         for a in engine.adapter_info()],
            "replica": self.replica_id,
            "started": self.started,
        }

    def health(self) -> dict[str, Any]:
        return {"ok": self.engine.is_alive(), "replica": self.replica_id}

    def snapshot(self, stats: EngineStats | None = None) -> dict[str, Any]:
        """Metrics + engine stats (`stats`, or taken now) of this replica, for /metrics and /admin/stats."""
        stats = stats or self.engine.stats()
        self._observe_adapter_loads(stats)
        return {SNAPSHOT_REPLICA: self.replica_id, SNAPSHOT_METRICS: self.metrics.snapshot(), SNAPSHOT_ENGINE: stats.as_dict()}

    def _observe_adapter_loads(self, stats: EngineStats) -> None:
        """Move new load latencies from the pool's stats into a cumulative histogram.

        The pool keeps only the last 4096 latencies, which cannot back a Prometheus histogram
        (counts must never go down); `source_loads` is monotonic and counts the same loads, so the
        entries past what we have seen are the last `new` ones (the pool reads both together).
        """
        loads = stats.adapters.source_loads
        new = loads - self._loads_seen
        self._loads_seen = loads
        for seconds in stats.adapters.load_seconds[-new:] if new > 0 else ():
            self.metrics.observe_adapter_load(seconds)

    # ---- adapter admin (serve_app/admin.py) ---------------------------------------------------
    async def admin(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One adapter admin operation on this replica (serve_app/replica_admin.py)."""
        return await run_admin_op(self.engine, self.replica_id, op, payload)

    def shutdown(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
