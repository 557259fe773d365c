"""The HTTP API as a Starlette app over a `Backend`: the routes, reading bodies, mapping errors.

What each protocol's requests, answers and stream events look like is its own file's:
serve_app/tgi.py (TGI's routes and `/info`), serve_app/openai_api.py and openai_responses.py
(`/v1`), serve_app/admin.py (`/adapters`); the SSE loop they share is serve_app/streaming.py.

Starlette rather than FastAPI: every route parses its own JSON so that errors come out in TGI's
or OpenAI's exact shape and status (FastAPI's automatic validation answers 422 with its own
`detail` body), and SSE streams are plain async generators. The same app runs inside the Ray
Serve ingress (serve_app/deployments.py) and in-process over a LocalBackend (tests, benchmark).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine import EngineError
from serve_app import openai_api, openai_responses, tgi
from serve_app.admin import AdminApi, AdminConfig, admin_routes
from serve_app.backends import Backend
from serve_app.engine_request import EngineRequest, check_prompt_size
from serve_app.errors import ApiError, ErrorInfo, error_info, openai_error, tgi_error
from serve_app.http_counter import HttpCounter
from serve_app.http_guards import DEFAULT_MAX_BODY_BYTES, RequestGuard, error_response
from serve_app.metrics_exposition import render_prometheus
from serve_app.streaming import SSE_HEADERS, StreamEncoder, first_chunk, sse_stream
from serve_app.validation import parse_json_body

# Bodies larger than this are parsed in a worker thread, so that the event loop keeps serving other
# requests meanwhile (json.loads holds the GIL, but the loop gets it back every switch interval).
PARSE_INLINE_BYTES = 256 * 1024


def _check_content_type(request: Request) -> None:
    """JSON routes take `application/json` (or any `+json` type); no header at all is accepted too."""
    value = request.headers.get("content-type")
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media not in ("application/json", "*/*", "") and not media.endswith("+json"):
        shown = media if len(media) <= 60 else media[:57] + "..."
        raise ApiError(f"content-type: expected application/json, got {shown!r}", field="content-type",
                       kind="unsupported_media")


async def _read_json(request: Request) -> Any:
    """The request's JSON body. Its size limit is RequestGuard's (serve_app/http_guards.py): reading
    past it raises BodyTooLarge (an ApiError) and stops reading."""
    _check_content_type(request)
    try:
        raw = await request.body()
    except ClientDisconnect as exc:
        raise ApiError("client disconnected while sending the body") from exc
    if len(raw) > PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_json_body, raw)
    return parse_json_body(raw)


# After a failed info lookup (no replica up), requests skip the ingress-side prompt check this long.
INFO_RETRY_S = 5.0


class ReplicaInfo:
    """The model replicas' static info (model name, limits), fetched once, and the prompt check it allows."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._info: dict[str, Any] | None = None
        self._failed_at = -INFO_RETRY_S

    async def get(self) -> dict[str, Any]:
        # The static part (model name, limits) never changes for a deployment; cache it.
        if self._info is None:
            self._info = await self.backend.info()
        return self._info

    async def check_prompt_size(self, ereq: EngineRequest) -> None:
        """The replica's prompt limits, applied here too, so that an oversized prompt is refused
        before it crosses to a replica. The replica checks again (it is the authority)."""
        if self._info is None and time.monotonic() - self._failed_at < INFO_RETRY_S:
            return  # the last lookup failed moments ago: do not make every request wait for another
        try:
            info = await self.get()
        except Exception:  # no replica answers now: the request itself will say so (503 within its timeout)
            self._failed_at = time.monotonic()
            return
        check_prompt_size(ereq, info.get("max_input_chars"), info.get("max_model_len"))


ErrorAnswer = Callable[[ErrorInfo], Response]


class RouteHandlers:
    """The route handlers of the HTTP API over one Backend (TGI, OpenAI, service and stats routes)."""

    def __init__(self, backend: Backend, counts: dict[tuple[str, str], int], ingress_id: str,
                 admin: AdminConfig) -> None:
        self.backend = backend
        self.ingress_id = ingress_id
        self.counts = counts
        self.admin_guard = AdminApi(backend, admin)  # /admin/stats answers only what the admin API would
        self.replica_info = ReplicaInfo(backend)

    async def _generate(self, ereq: EngineRequest, request_id: str) -> dict[str, Any]:
        """A non-streamed request's final result, or {"error": ErrorInfo} (an exception turned into one)."""
        try:
            return await self.backend.generate(ereq)
        except Exception as exc:
            return {"error": error_info(exc, request_id)}

    async def _stream(self, ereq: EngineRequest, request_id: str, encoder: StreamEncoder, refuse: ErrorAnswer,
                      headers: dict[str, str]) -> Response:
        """An SSE response, started once the first chunk is in (an error before it: `refuse`'s status)."""
        chunks = self.backend.stream(ereq)
        first, err = await first_chunk(chunks, request_id)
        if err is not None:
            await chunks.aclose()
            return refuse(err)
        return StreamingResponse(sse_stream(encoder, first or [], chunks, request_id),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    # ---- TGI ----------------------------------------------------------------------------------
    async def tgi(self, request: Request, stream: bool | None) -> Response:
        request_id = uuid.uuid4().hex
        arrival = time.time()
        headers = {"x-request-id": request_id}
        try:
            treq = tgi.parse_request(await _read_json(request), stream=stream)
            ereq = treq.engine_request(request_id, arrival)
            await self.replica_info.check_prompt_size(ereq)
        except (ApiError, EngineError) as exc:
            return tgi_error(error_info(exc), headers)
        if treq.stream:
            return await self._stream(ereq, request_id, tgi.TgiStream(treq), lambda info: tgi_error(info, headers),
                                      headers)
        result = await self._generate(ereq, request_id)
        if "error" in result:
            return tgi_error(result["error"], headers)
        headers.update(tgi.result_headers(result, arrival))
        return JSONResponse(tgi.generate_body(treq, result), headers=headers)

    async def generate(self, request: Request) -> Response:
        return await self.tgi(request, stream=False)

    async def generate_stream(self, request: Request) -> Response:
        return await self.tgi(request, stream=True)

    async def compat(self, request: Request) -> Response:
        return await self.tgi(request, stream=None)

    # ---- OpenAI -------------------------------------------------------------------------------
    async def openai(self, request: Request, chat: bool) -> Response:
        request_id = uuid.uuid4().hex
        arrival = time.time()
        prompt_field = "messages" if chat else "prompt"
        try:
            body = await _read_json(request)
            oreq = openai_api.parse_chat(body) if chat else openai_api.parse_completion(body)
            ereq = oreq.engine_request(request_id, arrival)
            await self.replica_info.check_prompt_size(ereq)
        except (ApiError, EngineError) as exc:
            return openai_error(error_info(exc), prompt_field)
        try:
            model_name = oreq.adapter_id or (await self.replica_info.get())["model_id"]
        except Exception as exc:
            return openai_error(error_info(exc, request_id), prompt_field)
        if oreq.stream:
            encoder = openai_responses.OpenAIStream(oreq, request_id, model_name, prompt_field)
            return await self._stream(ereq, request_id, encoder, lambda info: openai_error(info, prompt_field),
                                      {"x-request-id": request_id})
        result = await self._generate(ereq, request_id)
        if "error" in result:
            return openai_error(result["error"], prompt_field)
        make = openai_responses.chat_response if chat else openai_responses.completion_response
        return JSONResponse(make(oreq, result, request_id, model_name), headers={"x-request-id": request_id})

    async def completions(self, request: Request) -> Response:
        return await self.openai(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.openai(request, chat=True)

    async def models(self, request: Request) -> Response:
        try:
            info = await self.backend.info()
        except Exception as exc:
            return openai_error(error_info(exc))
        return JSONResponse(openai_responses.models_body(info))

    # ---- service routes -----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            ok = bool((await self.backend.health()).get("ok"))
        except Exception:
            ok = False
        if ok:
            return Response(status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    async def info(self, request: Request) -> Response:
        try:
            info = await self.backend.info()
        except Exception as exc:
            return tgi_error(error_info(exc))
        return JSONResponse(tgi.info_body(info))

    async def metrics(self, request: Request) -> Response:
        try:
            snapshots = await self.backend.snapshots()
        except Exception:
            snapshots = []  # still expose the ingress's own counters
        return Response(render_prometheus(snapshots, dict(self.counts), self.ingress_id), media_type=CONTENT_TYPE_LATEST)

    async def admin_stats(self, request: Request) -> Response:
        """Every replica's metrics and engine stats (per-adapter traffic): the admin API's guard applies."""
        if (refused := self.admin_guard.refuse(request)) is not None:
            return refused
        try:
            snapshots = await self.backend.snapshots()
        except Exception as exc:
            return tgi_error(error_info(exc))
        return JSONResponse({"replicas": snapshots})


def _not_found_handler(kind: str) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        detail = f"{request.method} {request.url.path}: " + ("not found" if kind == "not_found" else "method not allowed")
        return error_response(request.scope, ApiError(detail, kind=kind).info)

    return handler


def create_app(backend: Backend, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, ingress_id: str = "local",
               admin: AdminConfig | None = None) -> Starlette:
    counts: dict[tuple[str, str], int] = {}
    api = RouteHandlers(backend, counts, ingress_id, admin or AdminConfig())
    routes = [
        Route("/", api.compat, methods=["POST"]),
        Route("/generate", api.generate, methods=["POST"]),
        Route("/generate_stream", api.generate_stream, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/info", api.info, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/admin/stats", api.admin_stats, methods=["GET"]),
        *admin_routes(backend, admin),  # /adapters: off (403) unless admin is enabled with a token
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found_handler("not_found"), 405: _not_found_handler("method")},
    )
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)  # inside HttpCounter: its 413/500s count
    app.add_middleware(HttpCounter, counts=counts, routes=[r.path for r in routes if "{" not in r.path])
    return app
