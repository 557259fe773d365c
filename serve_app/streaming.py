"""Streamed generations as server-sent events: the loop both protocols share; the events are theirs.

A backend stream yields chunks (lists of deltas, serve_app/engine_output.py `delta_dict`); an error arrives as
a final {"error": ErrorInfo} item. `sse_stream` turns them into SSE bytes with a protocol's
`StreamEncoder` (serve_app/tgi.py `TgiStream`, serve_app/openai_api.py `OpenAIStream`), which alone
knows what its events look like. The loop owns what is the same for both: one write per chunk, the
first chunk awaited before the response starts (so that a refused request gets a real status code,
not an SSE event), failures told in-band once the stream has started, and the backend stream
closed however the response ends (a client that disconnects included: that aborts the request in
the engine and frees its KV blocks).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve_app.errors import ApiError, ErrorInfo, error_info

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Chunk = list[dict[str, Any]]


def sse(data: Any) -> bytes:
    """One server-sent event carrying JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, allow_nan=False).encode() + b"\n\n"


class StreamEncoder(Protocol):
    """A protocol's stream events. `delta` is never an error item; a finished delta is the last."""

    def start(self) -> list[bytes]:
        """Events before the first token's (OpenAI's role chunk, an echoed prompt); often none."""
        ...

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        """The events of one delta (and, for the finished one, whatever ends the stream)."""
        ...

    def error(self, info: ErrorInfo) -> list[bytes]:
        """The in-band error that ends the stream (and whatever ends the stream after it)."""
        ...


async def first_chunk(chunks: AsyncIterator[Chunk], request_id: str) -> tuple[Chunk | None, ErrorInfo | None]:
    """The stream's first chunk, or the error it failed with before sending one."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        return None, error_info(ApiError("the stream ended before the first token", kind="incomplete"))
    except Exception as exc:
        return None, error_info(exc, request_id)
    if first and "error" in first[0]:
        return None, first[0]["error"]
    return first, None


async def sse_stream(encoder: StreamEncoder, first: Chunk, chunks: AsyncIterator[Chunk],
                     request_id: str) -> AsyncIterator[bytes]:
    """The response body of a stream whose `first` chunk has arrived (see the module docstring)."""
    try:
        out = encoder.start()
        pending = first
        while True:
            # One write per chunk: every ASGI message costs a hop through Serve's proxy.
            done = False
            for delta in pending:
                if "error" in delta:
                    out += encoder.error(delta["error"])
                    done = True
                    break
                out += encoder.delta(delta)
                if delta["finished"]:
                    done = True
                    break
            if out:
                yield b"".join(out)
            if done:
                return
            out = []
            try:
                pending = await chunks.__anext__()
            except StopAsyncIteration:
                break
        yield b"".join(encoder.error(error_info(ApiError("incomplete generation", kind="incomplete"))))
    except Exception as exc:  # the replica went away mid-stream: tell the client in-band
        yield b"".join(encoder.error(error_info(exc, request_id)))
    finally:
        await chunks.aclose()
