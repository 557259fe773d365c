"""Structured output (JSON schema, regex) on xgrammar: compiled grammars, per-request matchers, batch masks.

- `GrammarCompiler` turns a `GrammarSpec` into a compiled grammar, once per distinct spec: a bounded
  LRU cache (entries and bytes), failures remembered too, and requests that want the same spec while
  it compiles wait for that one compile. Compiling happens at submit, in a worker thread of the
  request's loop (`Engine.generate`), and inside a child process (engine/grammar_worker.py) that is
  killed at `COMPILE_TIMEOUT_S` and whose memory is capped: a hostile schema gets a 422 and costs
  the server one core for at most that long, never the step thread.
- Per request and per step (engine/grammar_mask.py): `RequestGrammar`, one request's matcher, and
  the batch masks applied to the logits.

Why xgrammar: measured against llguidance and outlines-core on SmolLM2's 49,152-token vocabulary
(`python -m loadtests.bench_grammar --libraries`, results in loadtests/results/grammar/): the
fastest to a first mask on a cold schema (17 ms, against about 1.0 s and 1.5 s) and among the cheapest
mask at batch 64. Its special tokens are blanked in the vocabulary given to it, so that no special
token (`<|im_start|>`, BOS, pad) can be emitted inside a JSON string; EOS stays allowed where the
grammar may end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError, InvalidRequestError, OverloadedError
from engine.grammar_mask import RequestGrammar, xgrammar_module
from engine.sampling_params import GrammarSpec

log = logging.getLogger("engine.grammar")

COMPILE_TIMEOUT_S = 10.0  # one schema's compile; beyond it the worker is killed and the request gets 422
QUEUE_TIMEOUT_S = 30.0  # waiting for the worker while it compiles other schemas; then 429
WORKER_START_TIMEOUT_S = 120.0  # importing xgrammar (and torch) on a busy 2-core machine
CACHE_MAX_ENTRIES = 512
CACHE_MAX_BYTES = 256 << 20  # a 10-field schema at a 49k vocabulary is about 1 MB compiled
FAILURES_REMEMBERED = 1024  # a bad or hostile schema sent again is refused without compiling
_WORKER = Path(__file__).with_name("grammar_worker.py")


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of the vocabulary: `vocab_size` = the model's logits width, specials blanked.

    xgrammar treats an empty token as special (never allowed, except a stop token where the grammar
    may end); left as text, `<|im_start|>` or `<s>` would be legal characters inside a JSON string.
    """
    xgr = xgrammar_module()
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = token
    return xgr.TokenizerInfo.from_vocab_and_metadata(encoded, detected.dump_metadata())


def json_vocab_filter(info: Any) -> torch.Tensor:
    """[ceil(vocab / 32)] int32 bitmask: the tokens a JSON output may contain, i.e. no raw control byte.

    JSON needs no byte below 0x20 outside strings (the grammars have no free whitespace) and allows none
    inside them (they are escaped), but xgrammar 0.2's strings with minLength/maxLength accept them; ANDed
    into a JSON request's mask, this keeps such output valid JSON. Specials (empty) stay to the grammar.
    """
    control = re.compile(rb"[\x00-\x1f]")
    vocab = int(info.vocab_size)
    allowed = torch.ones((vocab + 31) // 32 * 32, dtype=torch.bool)
    bad = [i for i, token in enumerate(info.decoded_vocab[:vocab]) if control.search(token)]
    allowed[bad] = False
    words = (allowed.view(-1, 32).long() << torch.arange(32)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ---- compiling --------------------------------------------------------------------------------------
def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from a pipe, or None at the deadline; raises EOFError if the writer is gone."""
    chunks: list[bytes] = []
    while size:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _Worker:
    """The compile child process (engine/grammar_worker.py)."""

    def __init__(self, info_json: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True,
        )
        try:
            self.send(info_json.encode())
            ready = self.receive(WORKER_START_TIMEOUT_S)
        except (EOFError, OSError):
            ready = None
        if ready != b"O":
            self.kill()
            raise EngineError("the grammar compiler could not be started")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()

    def receive(self, timeout_s: float) -> bytes | None:
        """The next frame, or None at the timeout; EOFError if the child died."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        header = _read_exact(fd, 4, deadline)
        if header is None:
            return None
        body = _read_exact(fd, struct.unpack(">I", header)[0], deadline + 5.0)  # it is already writing
        return body

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class GrammarCompiler:
    """GrammarSpec -> compiled grammar: cached, compiled in a killable child process, bounded in time.

    `compile` blocks (call it from a worker thread); `matcher` returns a fresh RequestGrammar. The
    child process starts on the first compile, so an engine that never sees a grammar never starts it.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], *,
        timeout_s: float = COMPILE_TIMEOUT_S, max_entries: int = CACHE_MAX_ENTRIES,
        max_bytes: int = CACHE_MAX_BYTES,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._info: Any = None
        self._json_vocab: torch.Tensor | None = None
        self._lock = threading.Lock()  # cache, failures, in-flight compiles, counters
        self._info_lock = threading.RLock()  # the tokenizer info and the JSON vocabulary filter
        self._worker_lock = threading.Lock()  # one compile at a time in the child
        self._worker: _Worker | None = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_bytes = 0
        self._failures: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future[Any]] = {}
        self._closed = False
        self.compiles = 0  # done in the child (cache misses that compiled)
        self.hits = 0

    # ---- public ---------------------------------------------------------------------------------
    def matcher(self, spec: GrammarSpec) -> RequestGrammar:
        """A matcher at the start of `spec`'s grammar; raises InvalidRequestError for a bad grammar."""
        compiled = self.compile(spec)
        return RequestGrammar(compiled, self._json_filter() if spec.type == "json" else None)

    def compile(self, spec: GrammarSpec) -> Any:
        key = (spec.type, spec.value)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
            if key in self._failures:
                self._failures.move_to_end(key)
                raise InvalidRequestError("grammar", self._failures[key])
            pending = self._inflight.get(key)
            if pending is None:
                pending = self._inflight[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:  # the same spec is compiling for another request: share its result or its error
            result = pending.result()
            with self._lock:
                self.hits += 1
            return result
        try:
            compiled = self._compile_now(spec)
        except InvalidRequestError as exc:
            with self._lock:
                self._remember_failure(key, str(exc).removeprefix("grammar: "))
            pending.set_exception(exc)
            raise
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        with self._lock:
            self._store(key, compiled)
        pending.set_result(compiled)
        return compiled

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"cached": len(self._cache), "cached_bytes": self._cache_bytes, "compiles": self.compiles,
                    "hits": self.hits, "failures_remembered": len(self._failures)}

    def close(self) -> None:
        self._closed = True
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    # ---- internals ------------------------------------------------------------------------------
    def _store(self, key: tuple[str, str], compiled: Any) -> None:
        size = int(compiled.memory_size_bytes)
        if size > self.max_bytes:  # used by this request, not kept
            return
        self._cache[key] = compiled
        self._cache_bytes += size
        while len(self._cache) > self.max_entries or self._cache_bytes > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= int(old.memory_size_bytes)

    def _remember_failure(self, key: tuple[str, str], message: str) -> None:
        self._failures[key] = message
        while len(self._failures) > FAILURES_REMEMBERED:
            self._failures.popitem(last=False)

    def _compile_now(self, spec: GrammarSpec) -> Any:
        if not self._worker_lock.acquire(timeout=QUEUE_TIMEOUT_S):
            raise OverloadedError("the grammar compiler is busy with other schemas; retry later",
                                  retry_after_s=self.timeout_s, scope="replica")
        try:
            if self._closed:
                raise EngineError("the engine is shutting down")
            worker = self._ensure_worker()
            started = time.monotonic()
            try:
                worker.send(f"{spec.type}\n{spec.value}".encode())
                reply = worker.receive(self.timeout_s)
            except (EOFError, OSError):
                self._drop_worker()
                raise InvalidRequestError(
                    "grammar", "compiling this grammar stopped the grammar compiler (out of memory?); simplify it"
                ) from None
            if reply is None:
                self._drop_worker()
                log.warning("grammar compile stopped after %.1f s (%s, %d chars)", time.monotonic() - started,
                            spec.type, len(spec.value))
                raise InvalidRequestError(
                    "grammar", f"did not compile within {self.timeout_s:g} s; simplify the schema or regex"
                )
            self.compiles += 1
            if reply[:1] == b"E":
                what = "JSON schema" if spec.type == "json" else "regex"
                raise InvalidRequestError("grammar", f"invalid {what}: {reply[1:].decode(errors='replace')}")
            return xgrammar_module().CompiledGrammar.deserialize_json(reply[1:].decode(), self._tokenizer_info())
        finally:
            self._worker_lock.release()

    def _json_filter(self) -> torch.Tensor:
        with self._info_lock:
            if self._json_vocab is None:
                self._json_vocab = json_vocab_filter(self._tokenizer_info())
            return self._json_vocab

    def _tokenizer_info(self) -> Any:
        with self._info_lock:  # built once, on first use (0.3 s at a 49k vocabulary)
            if self._info is None:
                self._info = tokenizer_info(self._tokenizer, self.vocab_size, self.stop_token_ids)
            return self._info

    def _ensure_worker(self) -> _Worker:
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = _Worker(self._tokenizer_info().serialize_json())
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
