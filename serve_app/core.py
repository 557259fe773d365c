"""What a model replica does, without Ray: one Engine behind a dict-in / dict-out interface.

`ModelReplica` (serve_app/deployments.py) is a thin Ray Serve shell around `ReplicaCore`; the
in-process backend (serve_app/backends.py) uses the same class directly, so the HTTP layer, the
request mapping and the metrics are tested without starting Ray. Everything that crosses the
ingress/replica boundary is a plain dict (cheap to pickle, no engine classes needed on the ingress).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

from engine import (
    Engine,
    EngineConfig,
    EngineError,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    TokenInfo,
)
from engine.config import AdapterSpec
from engine.errors import AdapterBusyError, AdapterLoadError, EngineDeadError, UnknownAdapterError
from engine.sampling_params import MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS
from serve_app.errors import error_info, status_label
from serve_app.metrics import ReplicaMetrics

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


class EngineRequest(TypedDict, total=False):
    """One generation request as the ingress sends it to a replica."""

    request_id: str
    model: str | None  # adapter id; None, "" or the base model's name mean the base model
    prompt: str | list[int]  # text or token ids ...
    messages: list[dict[str, Any]]  # ... or chat messages (rendered with the tokenizer's chat template)
    params: dict[str, Any]  # SamplingParams fields; max_new_tokens None = default_max_new_tokens
    default_max_new_tokens: int | None  # None: whatever room the context leaves
    truncate: int | None
    details: bool  # per-token details (ids, logprobs) in the final result
    arrival: float  # time.time() when the ingress received the request (for time to first token)


def prompt_chars(req: EngineRequest) -> int:
    """The size of a request's prompt in characters (chat: roles and contents), or token ids in a list."""
    messages = req.get("messages")
    if messages is not None:
        return sum(len(str(m.get("role") or "")) + len(str(m.get("content") or "")) for m in messages)
    return len(req.get("prompt") or "")


def check_prompt_size(req: EngineRequest, max_input_chars: int | None, max_model_len: int | None) -> None:
    """Refuse a prompt too big to tokenize (InvalidRequestError naming the field and the limit).

    The one rule for both sides: the ingress applies it with the limits from the replica's `info()`
    (before the prompt crosses to a replica), the replica again before it tokenizes.
    """
    size = prompt_chars(req)
    if req.get("messages") is not None:
        if max_input_chars is not None and size > max_input_chars:
            raise InvalidRequestError("messages", f"at most {max_input_chars} characters of roles and contents "
                                                  f"together (max_input_chars), given: {size}")
    elif isinstance(req.get("prompt"), list):
        if max_model_len is not None and size > max_model_len:
            raise InvalidRequestError("inputs", f"at most {max_model_len} token ids (max_model_len), given: {size}")
    elif max_input_chars is not None and size > max_input_chars:
        raise InvalidRequestError("inputs", f"`inputs` must have at most {max_input_chars} characters "
                                            f"(max_input_chars), given: {size}")


def _lower_thread_priority() -> None:
    """Initializer of the prepare workers. Linux sets priorities per thread; elsewhere this is a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)


def token_dict(token: TokenInfo) -> dict[str, Any]:
    lp = token.logprob
    # JSON has no NaN/inf: an impossible token (filtered by top-k/top-p) reports null.
    return {"id": token.id, "text": token.text, "logprob": lp if lp is not None and math.isfinite(lp) else None,
            "special": token.special}


def engine_alive(engine: Engine) -> bool:
    """Whether the engine's step loop still runs. Engine has no public liveness call yet."""
    thread = getattr(engine, "_thread", None)
    return getattr(engine, "_dead", None) is None and (thread is None or thread.is_alive())


class ReplicaCore:
    def __init__(self, config: EngineConfig, served_name: str, replica_id: str = "local",
                 stream_messages_per_s: float = DEFAULT_STREAM_MESSAGES_PER_S,
                 max_input_chars: int | None = None) -> None:
        self.engine = Engine(config)
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
    def resolve_adapter(self, model: str | None) -> str | None:
        """The engine adapter id for an API `model` / `adapter_id` value (None = base model)."""
        if model is None or model == "":
            return None
        if self.engine.has_adapter(model):
            return model
        if model == self.served_name:
            return None
        return model  # unknown: the engine answers UnknownAdapterError

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
            return self.engine.tokenize(list(tokenizer.encode(text, add_special_tokens=False)))
        prompt = req.get("prompt")
        if prompt is None:
            raise InvalidRequestError("inputs", "is required")
        return self.engine.tokenize(prompt)

    def prepare(self, req: EngineRequest) -> tuple[list[int], SamplingParams, str | None]:
        """Token ids, sampling parameters and adapter of a request; raises InvalidRequestError."""
        adapter_id = self.resolve_adapter(req.get("model"))
        check_prompt_size(req, self.max_input_chars, self.engine.max_model_len)
        ids = self._prompt_ids(req)
        truncate = req.get("truncate")
        if truncate is not None:
            if truncate < 1:
                raise InvalidRequestError("truncate", f"must be >= 1, got {truncate}")
            ids = ids[-truncate:]
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
        label = self._adapter_label(self.resolve_adapter(req.get("model")))
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
        want_details = bool(req.get("details"))
        tokens: list[dict[str, Any]] = []
        top: list[list[dict[str, Any]]] = []
        prefill: list[dict[str, Any]] = []
        final: RequestOutput | None = None
        try:
            # Iterate to the end (the engine stops after the final output) so that `outputs`
            # records this request's metrics now, not when the generator is garbage-collected.
            async for out in self.outputs(req):
                if want_details:
                    tokens.extend(token_dict(t) for t in out.tokens)
                    top.extend([token_dict(t) for t in alts] for alts in out.top_tokens)
                    if out.prefill:
                        prefill = [token_dict(t) for t in out.prefill]
                if out.finished:
                    final = out
        except Exception as exc:  # an unexpected one too: its text goes to the log, not to the client
            return {"error": error_info(exc, req.get("request_id"))}
        if final is None:
            return {"error": error_info(EngineError("the request ended without a result"))}
        result = _final_fields(final)
        result["token_ids"] = list(final.token_ids)
        if want_details:
            result.update(tokens=tokens, top_tokens=top, prefill=prefill)
        return result

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
                        chunk.append(_delta(item))
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
        return {"ok": engine_alive(self.engine), "replica": self.replica_id}

    def snapshot(self) -> dict[str, Any]:
        """Metrics + engine stats of this replica, for /metrics and /admin/stats."""
        self._observe_adapter_loads()
        stats = self.engine.stats()
        return {"replica": self.replica_id, "metrics": self.metrics.snapshot(), "engine": stats}

    def _observe_adapter_loads(self) -> None:
        """Move new load latencies from the pool into a cumulative histogram.

        The pool keeps only the last 4096 latencies (a list), which cannot back a Prometheus
        histogram (counts must never go down); `source_loads` is monotonic and counts the same loads,
        so the entries past what we have seen are the list's last `new` ones. Read both under the
        pool's lock, which `_read` appends under, so they agree.
        """
        pool = self.engine.pool
        with getattr(pool, "_lock", contextlib.nullcontext()):
            loads = pool.counters.source_loads
            new = loads - self._loads_seen
            latencies = list(pool.counters.load_seconds[-new:]) if new > 0 else []
        self._loads_seen = loads
        for seconds in latencies:
            self.metrics.observe_adapter_load(seconds)

    # ---- adapter admin (serve_app/admin.py) ---------------------------------------------------
    async def admin(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One admin operation on this replica: {"replica", "result"} or {"replica", "error": {kind, message}}.

        Loads read files (or download from the Hub): they run in a worker thread so that this
        replica's event loop keeps streaming tokens meanwhile.
        """
        try:
            if op == "list":
                result = {"adapters": self.engine.adapter_info()}
            else:
                result = await asyncio.to_thread(self._admin_op, op, payload)
        except Exception as exc:
            return {"replica": self.replica_id, "error": {"kind": _admin_kind(exc), "message": str(exc)}}
        return {"replica": self.replica_id, "result": result}

    def _admin_op(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        engine = self.engine
        adapter_id = str(payload["id"])
        if op == "load":
            source = str(payload.get("source") or adapter_id)
            # Again here, with this replica's own roots (the ingress checked first): nothing is read
            # unless the source is a Hub id or resolves under a configured root.
            engine.check_adapter_source(source)
            revision = payload.get("revision")
            spec = AdapterSpec(adapter_id, source, str(revision) if revision else None)
            return engine.load_adapter(spec, preload=bool(payload.get("preload", True)))
        if op == "reload":
            return engine.reload_adapter(adapter_id)
        if op == "unload":
            engine.unload_adapter(adapter_id)
            return {"id": adapter_id, "unloaded": True}
        raise InvalidRequestError("op", f"unknown admin operation {op!r}")

    def shutdown(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()


def _admin_kind(exc: BaseException) -> str:
    """The admin error kind of an engine exception (serve_app/admin.py maps kinds to statuses)."""
    if isinstance(exc, AdapterBusyError):
        return "busy"
    if isinstance(exc, UnknownAdapterError):
        return "unknown"
    if isinstance(exc, PermissionError):
        return "forbidden"
    if isinstance(exc, AdapterLoadError):
        return "adapter_load"
    if isinstance(exc, InvalidRequestError):
        return "validation"
    if isinstance(exc, EngineDeadError):
        return "unavailable"
    return "error"


def _final_fields(out: RequestOutput) -> dict[str, Any]:
    return {
        "finish_reason": out.finish_reason,
        "generated_text": out.generated_text or "",
        "generated_tokens": out.generated_tokens,
        "prompt_tokens": out.prompt_tokens,
        "seed": out.seed,
    }


def _delta(out: RequestOutput) -> dict[str, Any]:
    delta: dict[str, Any] = {
        "text": out.text,
        "token": token_dict(out.tokens[-1]) if out.tokens else None,
        "top_tokens": [token_dict(t) for t in out.top_tokens[-1]] if out.top_tokens else None,
        "finished": out.finished,
    }
    if out.finished:
        delta.update(_final_fields(out))
    return delta
