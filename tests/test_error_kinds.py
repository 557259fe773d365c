"""The one error-kind table (serve_app/errors.py) and the SSE loop both protocols share (serve_app/streaming.py).

Every kind the serve side names exists in the table; the admin API answers its replicas' kinds
with the statuses it always had; and a stream ends, fails and closes the same way on both protocols.
"""

from __future__ import annotations

import ast
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    AdapterBusyError,
    AdapterLoadError,
    EngineDeadError,
    InvalidRequestError,
    UnknownAdapterError,
)
from serve_app.errors import (
    KINDS,
    ApiError,
    ErrorInfo,
    admin_kind,
    admin_status,
    retry_after_header,
    status_label,
)
from serve_app.streaming import first_chunk, sse, sse_stream

SERVE_APP = Path(__file__).resolve().parents[1] / "serve_app"


def _kinds_named_in_serve_app() -> set[str]:
    """String values of every `kind=` keyword and every `"kind": ...` dict entry in serve_app/."""
    named: set[str] = set()
    for path in SERVE_APP.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "kind" and isinstance(node.value, ast.Constant):
                named.add(node.value.value)
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "kind" and isinstance(value, ast.Constant):
                        named.add(value.value)
    return named


def test_every_kind_the_serve_side_names_is_in_the_table() -> None:
    named = _kinds_named_in_serve_app()
    assert {"validation", "incomplete", "unavailable", "internal", "too_large"} <= named
    assert named <= set(KINDS), named - set(KINDS)
    with pytest.raises(ValueError, match="unknown error kind"):
        ApiError("x", kind="no-such-kind")


@pytest.mark.parametrize(("exc", "kind", "status", "error_type"), [
    (AdapterBusyError("a", "in use"), "busy", 409, "adapter_busy"),
    (UnknownAdapterError("a", []), "unknown", 404, "not_found"),
    (PermissionError("outside the roots"), "forbidden", 403, "forbidden"),
    (AdapterLoadError("a", "no adapter_config.json"), "adapter_load", 424, "adapter_load"),
    (InvalidRequestError("op", "unknown"), "validation", 422, "validation"),
    (EngineDeadError("step loop died"), "unavailable", 503, "unhealthy"),
    (RuntimeError("bug"), "error", 500, "admin"),
])
def test_admin_kinds_and_their_answers(exc: BaseException, kind: str, status: int, error_type: str) -> None:
    assert admin_kind(exc) == kind
    assert admin_status(kind) == (status, error_type)


def test_metric_labels_and_retry_after_come_from_the_table() -> None:
    assert [status_label(k) for k in ("validation", "unknown_adapter", "overloaded", "generation", "nope")] == \
        ["invalid", "invalid", "overloaded", "error", "error"]
    unavailable = ErrorInfo(message="m", kind="unavailable", field=None)
    overloaded = ErrorInfo(message="m", kind="overloaded", field=None, retry_after_s=2.2)
    assert retry_after_header(unavailable) == "5" and retry_after_header(overloaded) == "3"
    assert retry_after_header(ErrorInfo(message="m", kind="validation", field=None)) is None


# ---- the shared SSE loop ---------------------------------------------------------------------
class Recorder:
    """A StreamEncoder writing each delta's text (and errors) as plain events."""

    def start(self) -> list[bytes]:
        return [b"start;"]

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        return [delta["text"].encode() + b";"] + ([b"end;"] if delta["finished"] else [])

    def error(self, info: ErrorInfo) -> list[bytes]:
        return [f"error:{info['kind']};".encode()]


class Chunks:
    """A backend stream: the given chunks, then an exception or the end; records whether it was closed."""

    def __init__(self, chunks: list[list[dict[str, Any]]], fail: BaseException | None = None) -> None:
        self.chunks = chunks
        self.fail = fail
        self.closed = False

    def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        return self

    async def __anext__(self) -> list[dict[str, Any]]:
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


def _delta(text: str, finished: bool = False) -> dict[str, Any]:
    return {"text": text, "finished": finished}


async def _body(chunks: Chunks) -> list[bytes]:
    first, err = await first_chunk(chunks, "r")
    assert err is None and first is not None
    return [part async for part in sse_stream(Recorder(), first, chunks, "r")]


def test_one_write_per_chunk_and_the_stream_ends_at_the_finished_delta() -> None:
    chunks = Chunks([[_delta("a"), _delta("b")], [_delta("c", finished=True), _delta("never")]])
    assert asyncio.run(_body(chunks)) == [b"start;a;b;", b"c;end;"]
    assert chunks.closed


def test_a_stream_that_stops_early_or_fails_says_so_in_band() -> None:
    early = Chunks([[_delta("a")]])
    assert asyncio.run(_body(early)) == [b"start;a;", b"error:incomplete;"] and early.closed
    lost = Chunks([[_delta("a")]], fail=RuntimeError("replica gone"))
    assert asyncio.run(_body(lost)) == [b"start;a;", b"error:internal;"] and lost.closed
    refused = Chunks([[_delta("a"), {"error": ErrorInfo(message="m", kind="request_timeout", field=None)}]])
    assert asyncio.run(_body(refused)) == [b"start;a;error:request_timeout;"] and refused.closed


def test_first_chunk_errors_are_returned_not_streamed() -> None:
    info = ErrorInfo(message="full", kind="overloaded", field=None)
    assert asyncio.run(first_chunk(Chunks([[{"error": info}]]), "r")) == (None, info)
    first, err = asyncio.run(first_chunk(Chunks([]), "r"))
    assert first is None and err is not None and err["kind"] == "incomplete"


def test_sse_event_bytes() -> None:
    assert sse({"a": "é"}) == b'data: {"a": "\xc3\xa9"}\n\n'
    assert json.loads(sse([1])[6:]) == [1]
