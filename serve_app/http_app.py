"""The HTTP API as a Starlette app over a `Backend`: TGI routes, OpenAI routes, health/info/metrics.

Starlette rather than FastAPI: every route parses its own JSON so that errors come out in TGI's
or OpenAI's exact shape and status (FastAPI's automatic validation answers 422 with its own
`detail` body), and SSE streams are plain async generators. The same app runs inside the Ray
Serve ingress (serve_app/deployments.py) and in-process over a LocalBackend (tests, benchmark).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import EngineError
from serve_app import openai_api, tgi
from serve_app.admin import AdminApi, AdminConfig, admin_routes
from serve_app.backends import Backend
from serve_app.core import EngineRequest, check_prompt_size
from serve_app.errors import (
    ApiError,
    ErrorInfo,
    error_info,
    openai_error,
    openai_error_body,
    sse,
    tgi_error,
    tgi_error_body,
)
from serve_app.http_guards import DEFAULT_MAX_BODY_BYTES, RequestGuard
from serve_app.metrics import render_prometheus
from serve_app.validation import parse_json_body

VERSION = "0.1.0"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KNOWN_ROUTES = {
    "/", "/generate", "/generate_stream", "/health", "/info", "/metrics", "/v1/completions",
    "/v1/chat/completions", "/v1/models", "/admin/stats", "/adapters",
}


class HttpCounter:
    """ASGI middleware counting responses by route and status code (for loraserve_http_requests_total)."""

    def __init__(self, app: ASGIApp, counts: dict[tuple[str, str], int]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix
            path = path[len(root):] or "/"
        route = path if path in KNOWN_ROUTES else "other"  # bounded label values
        if path.startswith("/adapters/"):  # admin routes carry the adapter id: one label for them all
            route = "/adapters/{id}"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (route, str(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


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


class _Api:
    def __init__(self, backend: Backend, counts: dict[tuple[str, str], int], ingress_id: str,
                 admin: AdminConfig) -> None:
        self.backend = backend
        self.ingress_id = ingress_id
        self.counts = counts
        self.admin_guard = AdminApi(backend, admin)  # /admin/stats answers only what the admin API would
        self._info: dict[str, Any] | None = None
        self._info_failed_at = -INFO_RETRY_S

    async def info_cached(self) -> dict[str, Any]:
        # The static part (model name, limits) never changes for a deployment; cache it.
        if self._info is None:
            self._info = await self.backend.info()
        return self._info

    async def check_prompt_size(self, ereq: EngineRequest) -> None:
        """The replica's prompt limits, applied here too, so that an oversized prompt is refused
        before it crosses to a replica. The replica checks again (it is the authority)."""
        if self._info is None and time.monotonic() - self._info_failed_at < INFO_RETRY_S:
            return  # the last lookup failed moments ago: do not make every request wait for another
        try:
            info = await self.info_cached()
        except Exception:  # no replica answers now: the request itself will say so (503 within its timeout)
            self._info_failed_at = time.monotonic()
            return
        check_prompt_size(ereq, info.get("max_input_chars"), info.get("max_model_len"))

    async def _first_chunk(
        self, chunks: AsyncIterator[list[dict[str, Any]]], request_id: str
    ) -> tuple[list[dict[str, Any]] | None, ErrorInfo | None]:
        """Wait for the first chunk so that validation errors get a real status code, not an SSE event."""
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            return None, error_info(ApiError("the stream ended before the first token", kind="incomplete"))
        except Exception as exc:
            return None, error_info(exc, request_id)
        if first and "error" in first[0]:
            return None, first[0]["error"]
        return first, None

    # ---- TGI ----------------------------------------------------------------------------------
    async def tgi(self, request: Request, stream: bool | None) -> Response:
        request_id = uuid.uuid4().hex
        arrival = time.time()
        headers = {"x-request-id": request_id}
        try:
            treq = tgi.parse_request(await _read_json(request), stream=stream)
            ereq = treq.engine_request(request_id, arrival)
            await self.check_prompt_size(ereq)
        except (ApiError, EngineError) as exc:
            return tgi_error(error_info(exc), headers)
        if not treq.stream:
            try:
                result = await self.backend.generate(ereq)
            except Exception as exc:
                return tgi_error(error_info(exc, request_id), headers)
            if "error" in result:
                return tgi_error(result["error"], headers)
            body: Any = tgi.generate_response(treq, result)
            headers.update({
                "x-prompt-tokens": str(result["prompt_tokens"]),
                "x-generated-tokens": str(result["generated_tokens"]),
                "x-total-time": str(int((time.time() - arrival) * 1000)),
            })
            # `POST /` answers a list, as TGI's compat route (the Inference API's format) does.
            return JSONResponse([body] if stream is None else body, headers=headers)

        chunks = self.backend.stream(ereq)
        first, err = await self._first_chunk(chunks, request_id)
        if err is not None:
            await chunks.aclose()
            return tgi_error(err, headers)

        async def events() -> AsyncIterator[bytes]:
            index = 0
            finished = False
            try:
                pending = first or []
                while True:
                    # One write per chunk: every ASGI message costs a hop through Serve's proxy.
                    out: list[bytes] = []
                    for delta in pending:
                        if "error" in delta:
                            out.append(sse(tgi_error_body(delta["error"])))
                            finished = True
                            break
                        index += 1
                        out.append(sse(tgi.stream_event(treq, index, delta)))
                        if delta["finished"]:
                            finished = True
                            break
                    yield b"".join(out)
                    if finished:
                        return
                    try:
                        pending = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                if not finished:
                    yield sse(tgi_error_body(error_info(ApiError("incomplete generation", kind="incomplete"))))
            except Exception as exc:  # the replica went away mid-stream: tell the client in-band
                yield sse(tgi_error_body(error_info(exc, request_id)))
            finally:
                # Also runs when the client disconnects (Starlette cancels this generator): closing
                # the backend stream aborts the request in the engine and frees its KV blocks.
                await chunks.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

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
            await self.check_prompt_size(ereq)
        except (ApiError, EngineError) as exc:
            return openai_error(error_info(exc), prompt_field)
        try:
            model_name = oreq.model or (await self.info_cached())["model_id"]
        except Exception as exc:
            return openai_error(error_info(exc, request_id), prompt_field)
        if not oreq.stream:
            try:
                result = await self.backend.generate(ereq)
            except Exception as exc:
                return openai_error(error_info(exc, request_id), prompt_field)
            if "error" in result:
                return openai_error(result["error"], prompt_field)
            make = openai_api.chat_response if chat else openai_api.completion_response
            return JSONResponse(make(oreq, result, request_id, model_name), headers={"x-request-id": request_id})

        chunks = self.backend.stream(ereq)
        first, err = await self._first_chunk(chunks, request_id)
        if err is not None:
            await chunks.aclose()
            return openai_error(err, prompt_field)
        created = int(time.time())

        async def events() -> AsyncIterator[bytes]:
            try:
                if chat:
                    yield sse(openai_api.chat_chunk(oreq, request_id, model_name, created,
                                                    {"role": "assistant", "content": ""}, None, None))
                elif oreq.echo and isinstance(oreq.prompt, str):
                    yield sse(openai_api.completion_chunk(oreq, request_id, model_name, created, oreq.prompt,
                                                          None, None))
                pending = first or []
                while True:
                    out: list[bytes] = []  # one write per chunk, as above
                    done = False
                    for delta in pending:
                        if "error" in delta:
                            out += [sse(openai_error_body(delta["error"], prompt_field)), b"data: [DONE]\n\n"]
                            done = True
                            break
                        reason = delta.get("finish_reason") if delta["finished"] else None
                        if chat:
                            if delta["text"] or oreq.logprobs is not None:
                                out.append(sse(openai_api.chat_chunk(oreq, request_id, model_name, created,
                                                                     {"content": delta["text"]}, delta, None)))
                            if delta["finished"]:
                                out.append(sse(openai_api.chat_chunk(oreq, request_id, model_name, created, {},
                                                                     None, reason)))
                        else:
                            out.append(sse(openai_api.completion_chunk(oreq, request_id, model_name, created,
                                                                       delta["text"], delta, reason)))
                        if delta["finished"]:
                            if oreq.include_usage:
                                out.append(sse(openai_api.usage_chunk(oreq, request_id, model_name, created,
                                                                      delta["prompt_tokens"],
                                                                      delta["generated_tokens"])))
                            out.append(b"data: [DONE]\n\n")
                            done = True
                            break
                    if out:
                        yield b"".join(out)
                    if done:
                        return
                    try:
                        pending = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                yield sse(openai_error_body(error_info(ApiError("incomplete generation", kind="incomplete"))))
                yield b"data: [DONE]\n\n"
            except Exception as exc:
                yield sse(openai_error_body(error_info(exc, request_id), prompt_field))
                yield b"data: [DONE]\n\n"
            finally:
                await chunks.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, "x-request-id": request_id})

    async def completions(self, request: Request) -> Response:
        return await self.openai(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.openai(request, chat=True)

    async def models(self, request: Request) -> Response:
        try:
            info = await self.backend.info()
        except Exception as exc:
            return openai_error(error_info(exc))
        created = int(info.get("started", 0))
        base = info["model_id"]
        data = [{"id": base, "object": "model", "created": created, "owned_by": "loraserve", "root": base,
                 "parent": None}]
        # `root` is the adapter's id, not its source: sources are paths, shown on the admin API only.
        data += [{"id": a["id"], "object": "model", "created": created, "owned_by": "loraserve",
                  "root": a["id"], "parent": base} for a in info["adapters"]]
        return JSONResponse({"object": "list", "data": data})

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
        max_len = int(info["max_model_len"])
        return JSONResponse({
            "model_id": info["model_id"],
            "model_sha": None,
            "model_dtype": info["model_dtype"],
            "model_device_type": info["model_device_type"],
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": info["max_waiting"],
            "max_best_of": 1,
            "max_stop_sequences": info["max_stop_sequences"],
            "max_input_tokens": max_len - 1,
            "max_input_length": max_len - 1,
            "max_input_chars": info["max_input_chars"],
            "max_total_tokens": max_len,
            "max_new_tokens": info["max_new_tokens_limit"],
            "max_top_n_tokens": info["max_top_n_tokens"],
            "max_batch_size": info["max_num_seqs"],
            "max_batch_prefill_tokens": info["max_num_batched_tokens"],
            "max_client_batch_size": 1,
            "max_adapter_slots": info["max_adapter_slots"],
            "max_lora_rank": info["max_lora_rank"],
            "validation_workers": 0,
            "router": "loraserve (Ray Serve)",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
            "adapters": [{"id": a["id"], "base_model_mismatch": bool(a.get("base_model_mismatch", False))}
                         for a in info["adapters"]],  # ids only: sources are the admin API's
        })

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
        info = ApiError(detail, kind=kind).info
        if request.url.path.startswith("/v1/"):
            return openai_error(info)
        return tgi_error(info)

    return handler


def create_app(backend: Backend, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, ingress_id: str = "local",
               admin: AdminConfig | None = None) -> Starlette:
    counts: dict[tuple[str, str], int] = {}
    api = _Api(backend, counts, ingress_id, admin or AdminConfig())
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
    app.state.http_counts = counts
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)  # inside HttpCounter: its 413/500s count
    app.add_middleware(HttpCounter, counts=counts)
    return app
