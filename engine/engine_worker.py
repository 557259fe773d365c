"""The child side of EngineProcess (engine/engine_process.py): an Engine in a process of its own.

Run as `python -m engine.engine_worker FD`, FD being its end of a socket pair. The first message
is (config, torch_threads); it answers ("ready", info) once the Engine is built, or ("failed",
error). Then, on one asyncio loop:

- ("generate", request_id, prompt, params, adapter_id, truncate) runs Engine.generate and sends
  each output as ("out", request_id, output), or ("error", request_id, error) when it raises;
- ("abort", request_id) closes that generator (which aborts the request and frees its blocks);
- ("call", call_id, method, args) runs one of CALLS and answers ("reply", call_id, ok, value);
- ("shutdown",) or the other end closing stops the Engine and exits.

Outgoing messages are sent in batches, one send per loop turn: one step's outputs for all its
requests cross as one message. The loop also watches the Engine's step thread (("dead", reason)
once it has died) and the parent process (a worker whose parent is gone exits: it is never left
running on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from multiprocessing.connection import Connection
from typing import Any

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import error_to_wire

log = logging.getLogger("engine")

# Calls that read state answer on the loop; those that may read files or wait for the lock on a
# busy engine run in a worker thread, so that streaming goes on meanwhile.
QUICK_CALLS = frozenset({"stats", "adapter_info", "is_alive", "check_adapter_source", "check_idle_invariants"})
SLOW_CALLS = frozenset({"load_adapter", "reload_adapter", "unload_adapter"})
CALLS = QUICK_CALLS | SLOW_CALLS
WATCH_INTERVAL_S = 0.5


def ready_info(engine: Engine) -> dict[str, Any]:
    """What the parent needs to answer without asking: tokenizer, limits, adapter ids."""
    return {
        "pid": os.getpid(),
        "model_dir": str(engine.model_dir),
        "vocab_size": engine.arch.vocab_size,
        "max_model_len": engine.max_model_len,
        "adapter_ids": [a["id"] for a in engine.adapter_info()],
    }


class Worker:
    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[tuple[Any, ...]] = []
        self._stopped: asyncio.Event | None = None
        self._parent = os.getppid()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        watch = loop.create_task(self._watch())
        try:
            await self._stopped.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            watch.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._flush()

    # ---- incoming -----------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            while self.conn.poll(0):
                self._dispatch(self.conn.recv())
        except (EOFError, OSError):  # the parent closed its end (or died): stop
            self._stop()

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "generate":
            _, request_id, prompt, params, adapter_id, truncate = msg
            task = asyncio.get_running_loop().create_task(self._generate(request_id, prompt, params, adapter_id, truncate))
            self._tasks[request_id] = task
        elif kind == "abort":
            task = self._tasks.get(msg[1])
            if task is not None:
                task.cancel()
        elif kind == "call":
            asyncio.get_running_loop().create_task(self._call(*msg[1:]))
        elif kind == "shutdown":
            self._stop()
        else:
            log.error("engine worker: unknown message %r", kind)

    async def _generate(self, request_id: str, prompt: Any, params: Any, adapter_id: str | None,
                        truncate: int | None) -> None:
        try:
            async with contextlib.aclosing(self.engine.generate(prompt, params, adapter_id, request_id,
                                                                truncate)) as outputs:
                async for out in outputs:
                    self._send(("out", request_id, out))
        except asyncio.CancelledError:
            pass  # aborted by the parent: closing the generator aborted the request
        except Exception as exc:
            self._send(("error", request_id, error_to_wire(exc)))
        finally:
            self._tasks.pop(request_id, None)

    async def _call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"unknown engine call {method!r}")
            fn = getattr(self.engine, method)
            value = await asyncio.to_thread(fn, *args) if method in SLOW_CALLS else fn(*args)
        except Exception as exc:
            self._send(("reply", call_id, False, error_to_wire(exc)))
        else:
            self._send(("reply", call_id, True, value))

    # ---- outgoing -----------------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(msg)

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch:
            with contextlib.suppress(OSError):  # the parent is gone: the reader sees EOF and stops us
                self.conn.send(batch)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        reported = False
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if os.getppid() != self._parent:  # re-parented: the parent died without closing its end
                self._stop()
                return
            if not reported and not self.engine.is_alive():
                reported = True
                self._send(("dead", "the engine's step loop stopped"))

    def _stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(int(argv[0]))
    config, torch_threads = conn.recv()
    assert isinstance(config, EngineConfig)
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    try:
        engine = Engine(config)
    except Exception as exc:
        log.exception("engine worker: the engine failed to start")
        conn.send(("failed", error_to_wire(exc)))
        return 1
    try:
        conn.send(("ready", ready_info(engine)))
        asyncio.run(Worker(engine, conn).run())
    finally:
        engine.shutdown()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
