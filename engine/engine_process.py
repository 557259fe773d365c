"""An Engine in its own process, behind the same methods (vLLM v1's AsyncLLM over its EngineCore process).

Why: the engine's step thread runs Python between its torch ops (scheduling, batch preparation,
detokenizing) and needs the GIL for it. In a Ray Serve replica the same process also runs Serve's
event loops, its request and metrics threads and the serialization of every message, all of them
needing the same GIL. Measured on 2 cores under the noisy-neighbour load (py-spy, issue 13), the
step thread spent about 45% of its time waiting for the GIL, so every step, and with it every
adapter's first token, took about twice as long; and the replica's loops, waiting for the GIL in
turn, answered Serve's probes and calls late. In a process of its own the engine has a GIL of its
own, and the replica's process keeps only the serving.

What crosses (a socket pair, pickled messages, engine/engine_worker.py is the other end): requests
(token ids or text, SamplingParams, adapter id), aborts, and calls for stats and adapter admin one
way; each step's outputs, in one message, and the answers the other way. Tokenizing stays here:
the server tokenizes before it submits, as it did beside an in-process Engine. Errors arrive as the
engine raised them (engine/errors.py `error_from_wire`). Every wait is bounded: the start by
`startup_timeout_s`, each call by `call_timeout_s` (adapter loads by the config's
`adapter_load_timeout_s` and a margin). If the worker process dies, every open stream fails with
EngineDeadError at once and `is_alive()` turns False (the replica's health check then has it
replaced); if this process dies, the worker sees its end close and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from transformers import AutoTokenizer

from engine.config import AdapterSpec, EngineConfig
from engine.engine import tokenize_prompt
from engine.errors import EngineDeadError, EngineError, InvalidRequestError, error_from_wire
from engine.outputs import RequestOutput, final_output
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

log = logging.getLogger("engine")

DEFAULT_STARTUP_TIMEOUT_S = 900.0  # loading a large model from a slow disk takes minutes
DEFAULT_CALL_TIMEOUT_S = 30.0
LOAD_MARGIN_S = 30.0  # an adapter call may take its load timeout plus reading and validating
SHUTDOWN_WAIT_S = 10.0

_Item = RequestOutput | BaseException
_Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[_Item]"]  # an open request: its caller's loop and queue


class EngineProcess:
    """Engine's methods (those the server uses) over an Engine running in a child process."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
                 call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        config.validate()
        self.config = config
        self.call_timeout_s = call_timeout_s
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future[tuple[bool, Any]]] = {}
        self._call_ids = itertools.count()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._closing = False  # shutdown() asked the worker to stop: its exit is no failure
        self._proc, self._conn = _start_worker(config, torch_threads)
        try:
            info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._kill()
            raise
        self.pid: int = info["pid"]
        self.model_dir: str = info["model_dir"]
        self.vocab_size: int = info["vocab_size"]
        self.max_model_len: int = info["max_model_len"]
        self._adapter_ids: set[str] = set(info["adapter_ids"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._reader = threading.Thread(target=self._read_loop, name="engine-process-reader", daemon=True)
        self._reader.start()
        log.info("engine process %d ready: %s", self.pid, config.model)

    @property
    def model_id(self) -> str:
        return self.config.model

    def is_alive(self) -> bool:
        """False once the worker process has exited or its step loop has died."""
        return self._dead is None and self._proc.poll() is None

    # ---- adapters -----------------------------------------------------------------------------
    def has_adapter(self, adapter_id: str) -> bool:
        """O(1), without asking the worker: the ids it started with and those added through here."""
        return adapter_id in self._adapter_ids

    def adapter_info(self) -> list[dict[str, Any]]:
        info: list[dict[str, Any]] = self._call("adapter_info")
        self._adapter_ids = {a["id"] for a in info}
        return info

    def check_adapter_source(self, source: str) -> None:
        self._call("check_adapter_source", source)

    def load_adapter(self, spec: AdapterSpec, preload: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("load_adapter", spec, preload, timeout=self._load_timeout_s())
        self._adapter_ids.add(spec.adapter_id)
        return result

    def reload_adapter(self, adapter_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("reload_adapter", adapter_id, timeout=self._load_timeout_s())
        return result

    def unload_adapter(self, adapter_id: str) -> None:
        self._call("unload_adapter", adapter_id)
        self._adapter_ids.discard(adapter_id)

    def _load_timeout_s(self) -> float:
        return max(self.call_timeout_s, self.config.adapter_load_timeout_s + LOAD_MARGIN_S)

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], truncate: int | None = None) -> list[int]:
        return tokenize_prompt(self.tokenizer, self.vocab_size, prompt, truncate)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        truncate: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Engine.generate, in the worker: the same outputs and errors; closing early aborts there."""
        self._raise_if_dead()
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._streams:
            raise InvalidRequestError("request_id", f"{rid!r} is already in use")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self._send(("generate", rid, prompt, params or SamplingParams(), adapter_id, truncate))
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
            self._streams.pop(rid, None)
            if not finished and self._dead is None:
                with contextlib.suppress(EngineDeadError):
                    self._send(("abort", rid))

    async def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        truncate: int | None = None,
    ) -> RequestOutput:
        return await final_output(self.generate(prompt, params, adapter_id, request_id, truncate))

    def abort(self, request_id: str) -> bool:
        """Ask the worker to stop a request. False if this side has no such request in flight."""
        if request_id not in self._streams or self._dead is not None:
            return False
        self._send(("abort", request_id))
        return True

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        stats: EngineStats = self._call("stats")
        return stats

    def check_idle_invariants(self) -> None:
        self._call("check_idle_invariants")

    def shutdown(self) -> None:
        """Stop the worker (it stops its engine and exits); killed if it has not within SHUTDOWN_WAIT_S."""
        self._closing = True
        if self._proc.poll() is None:
            with contextlib.suppress(EngineError, OSError):
                self._send(("shutdown",))
            try:
                self._proc.wait(timeout=SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("engine process %d did not stop within %.0f s; killing it", self._proc.pid,
                            SHUTDOWN_WAIT_S)
        self._kill()

    # ---- the connection -----------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as exc:
            raise EngineDeadError(f"the engine process is gone: {exc}") from exc

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        self._raise_if_dead()
        call_id = next(self._call_ids)
        future: concurrent.futures.Future[tuple[bool, Any]] = concurrent.futures.Future()
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, method, args))
            wait_s = timeout or self.call_timeout_s
            try:
                ok, value = future.result(timeout=wait_s)
            except concurrent.futures.TimeoutError:
                raise EngineError(f"the engine did not answer {method} within {wait_s:g} s") from None
        finally:
            self._calls.pop(call_id, None)
        if not ok:
            raise error_from_wire(value)
        return value

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            raise EngineError(f"the engine process did not start within {timeout_s:g} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            raise EngineDeadError(f"the engine process exited while starting (code {self._proc.wait()})") from None
        if kind == "failed":
            raise error_from_wire(payload)
        info: dict[str, Any] = payload
        return info

    def _read_loop(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            code = self._proc.wait()
            reason = f"the engine process exited (code {code})"
        except BaseException as exc:  # a bug here must still fail the streams, not leave them waiting
            log.exception("engine process reader failed")
            reason = f"the engine process reader failed: {exc!r}"
        finally:
            self._fail_everything(reason)

    def _dispatch(self, batch: list[tuple[Any, ...]]) -> None:
        deliveries: list[tuple[_Stream, _Item]] = []
        for msg in batch:
            kind = msg[0]
            if kind in ("out", "error"):
                entry = self._streams.get(msg[1])
                if entry is not None:
                    item = msg[2] if kind == "out" else error_from_wire(msg[2])
                    deliveries.append((entry, item))
            elif kind == "reply":
                future = self._calls.get(msg[1])
                if future is not None and not future.done():
                    future.set_result((msg[2], msg[3]))
            elif kind == "dead":
                log.error("engine process %d: %s", self.pid, msg[1])
                self._dead = str(msg[1])
        _deliver_threadsafe(deliveries)

    def _fail_everything(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        if not self._closing or self._streams:
            log.error("engine process: %s; failing %d open requests", reason, len(self._streams))
        _deliver_threadsafe([(entry, EngineDeadError(reason)) for entry in list(self._streams.values())])
        for future in list(self._calls.values()):
            if not future.done():
                future.set_result((False, ("EngineDeadError", reason, {})))

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=SHUTDOWN_WAIT_S)
        with contextlib.suppress(OSError):
            self._conn.close()


def _deliver(items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _deliver_threadsafe(deliveries: list[tuple[_Stream, _Item]]) -> None:
    """Hand each item to its stream's queue on that stream's loop: one call per loop, in order."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = defaultdict(list)
    for (loop, queue), item in deliveries:
        by_loop[loop].append((queue, item))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: its requests are gone with it
            loop.call_soon_threadsafe(_deliver, items)


def _start_worker(config: EngineConfig, torch_threads: int | None) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start `python -m engine.engine_worker` on one end of a socket pair and send it its config.

    A fresh interpreter (not multiprocessing's fork or spawn): fork would copy a process with
    threads and maybe CUDA, and spawn re-imports the parent's __main__ (a Ray worker's). The child
    gets this process's import path, so it imports the same engine.
    """
    mine, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    fd = theirs.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "engine.engine_worker", str(fd)], pass_fds=(fd,), env=env)
    theirs.close()
    conn = Connection(mine.detach())
    try:
        conn.send((config, torch_threads))
    except OSError:
        proc.kill()
        raise
    return proc, conn
