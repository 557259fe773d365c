"""ASGI middleware that every request passes first: a bounded body, and no exception text in a response.

Body size: Starlette's `request.body()` reads until the client stops, so a limit checked after it
has already buffered a 64 MB chunked upload. Here `Content-Length` is checked before anything is
read, and a body without one (chunked) is counted message by message as the route reads it: the
read that crosses the limit raises `BodyTooLarge`, an ApiError the routes answer with 413 (or this
middleware does, for routes such as the admin API that do not catch it), and the rest of the
body is never read. The admin routes get the admin API's own, smaller limit.

Failures: an exception a route does not handle would reach Starlette's default 500 (plain text)
or, worse, a server that prints it. It is logged here with its traceback and answered with a
plain message in the route's error shape (TGI or OpenAI); nothing of its text reaches the client.
"""

from __future__ import annotations

import logging
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.admin import MAX_ADMIN_BODY
from serve_app.errors import INTERNAL_ERROR_MESSAGE, ApiError, ErrorInfo, openai_error, tgi_error

log = logging.getLogger("serve_app")
# TGI's default `--payload-limit`. Far above any valid request: max_input_chars of the largest contexts,
# every character a 6-byte JSON escape, is a few hundred KB; beyond it a body is refused before it is read.
DEFAULT_MAX_BODY_BYTES = 2_000_000


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, content_length: int | None = None) -> None:
        got = f" (Content-Length: {content_length})" if content_length is not None else ""
        super().__init__(f"request body is larger than the limit of {limit} bytes{got}", kind="too_large")


def route_path(scope: Scope) -> str:
    """The path inside the app (without the route prefix it is mounted under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def error_response(scope: Scope, info: ErrorInfo) -> JSONResponse:
    """`info` in the shape of the route that was asked: OpenAI's under /v1, TGI's elsewhere."""
    return openai_error(info) if route_path(scope).startswith("/v1/") else tgi_error(info)


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, admin_body_bytes: int = MAX_ADMIN_BODY) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admin_body_bytes = admin_body_bytes

    def limit_for(self, path: str) -> int:
        admin = path == "/adapters" or path.startswith("/adapters/")
        return self.admin_body_bytes if admin else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(route_path(scope))
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before a byte of the body is read
            await error_response(scope, BodyTooLarge(limit, declared).info)(scope, receive, send)
            return

        received = 0
        started = False

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except ApiError as exc:  # raised past a route that does not answer it itself (BodyTooLarge)
            if not started:
                await error_response(scope, exc.info)(scope, receive, send)
        except Exception:
            request_id = uuid.uuid4().hex
            log.exception("request %s: unhandled error in %s %s", request_id, scope.get("method"), route_path(scope))
            if not started:  # once a response has started, the only thing left is to end it (the server does)
                info = ApiError(f"{INTERNAL_ERROR_MESSAGE} (request id {request_id})", kind="internal").info
                await error_response(scope, info)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            # More digits than any limit has: too large, without converting a huge digit string.
            if text.isdigit():
                return int(text) if len(text) <= 18 else 10**18
            return None  # malformed: the server (uvicorn/h11) refuses these itself
    return None
