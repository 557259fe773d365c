"""Errors as data: one shape between replica and ingress, then TGI's or OpenAI's shape on the wire.

Engine exceptions do not cross the Ray boundary as exceptions: `InvalidRequestError(field, message)`
has a custom constructor, and Ray's re-raised `RayTaskError` wrappers would hide the type. The
replica turns each into an `ErrorInfo` dict instead, and the ingress maps its `kind` to a status.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, NotRequired, TypedDict

from starlette.responses import JSONResponse

from engine.errors import (
    AdapterLoadError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    NonFiniteOutputError,
    OverloadedError,
    QueueTimeoutError,
    RequestTimeoutError,
    UnknownAdapterError,
)


class ErrorInfo(TypedDict):
    message: str
    # validation | unknown_adapter | overloaded | queue_timeout | request_timeout | adapter_load | generation |
    # unavailable | not_found | ...
    kind: str
    error_type: str  # TGI's error_type
    field: str | None
    retry_after_s: NotRequired[float]  # the engine's own estimate (OverloadedError); else RETRY_AFTER_S[kind]


# kind -> (TGI status, TGI error_type, OpenAI status, OpenAI type, OpenAI code)
_MAP: dict[str, tuple[int, str, int, str, str | None]] = {
    "validation": (422, "validation", 400, "invalid_request_error", None),
    "unknown_adapter": (422, "validation", 404, "invalid_request_error", "model_not_found"),
    "not_found": (404, "not_found", 404, "invalid_request_error", None),
    "method": (405, "validation", 405, "invalid_request_error", None),
    "too_large": (413, "validation", 413, "invalid_request_error", None),
    "overloaded": (429, "overloaded", 429, "rate_limit_error", "rate_limit_exceeded"),
    # No first token within max_queue_wait_s: the replica is saturated, not the client's adapter over its
    # share (that is a 429 at arrival); 503 + Retry-After as for any server-side capacity problem.
    "queue_timeout": (503, "queue_timeout", 503, "server_error", "queue_timeout"),
    # Stopped at the engine's request_timeout_s (tokens already streamed stand): a gateway-style timeout.
    "request_timeout": (504, "request_timeout", 504, "server_error", "request_timeout"),
    "adapter_load": (424, "generation", 500, "server_error", "adapter_load_failed"),
    "generation": (424, "generation", 500, "server_error", None),
    "incomplete": (500, "incomplete_generation", 500, "server_error", None),
    "unavailable": (503, "unhealthy", 503, "server_error", None),
    "unsupported_media": (415, "validation", 415, "invalid_request_error", None),
    "internal": (500, "internal", 500, "server_error", "internal_error"),
}

log = logging.getLogger("serve_app")
INTERNAL_ERROR_MESSAGE = "internal error; see the server log"
ENGINE_STOPPED_MESSAGE = "the model replica's engine stopped; retry the request"
# An absolute filesystem path ("/home/u/adapters/x/adapter_config.json"): engine messages about files
# (a failed adapter read) name them, and public responses must not. Hub ids ("org/name") are kept.
_FS_PATH = re.compile(r"(?<![\w.~/-])/(?:[^\s/'\"`():,;<>]+/)+[^\s/'\"`():,;<>]*")


def without_paths(message: str) -> str:
    return _FS_PATH.sub("<path>", message)


def unknown_adapter_message(adapter_id: str) -> str:
    """Names the id the client sent, never the other adapters (they may be other tenants')."""
    shown = adapter_id if len(adapter_id) <= 80 else adapter_id[:77] + "..."
    return f"adapter_id: unknown adapter {shown!r}; GET /v1/models lists the adapters this server serves"


class ApiError(Exception):
    """Raised by request parsing in the ingress; carries the same fields as ErrorInfo."""

    def __init__(self, message: str, *, field: str | None = None, kind: str = "validation") -> None:
        super().__init__(message)
        self.info = ErrorInfo(message=message, kind=kind, error_type=_MAP[kind][1], field=field)


def error_info(exc: BaseException, request_id: str | None = None) -> ErrorInfo:
    """The ErrorInfo for an engine (or any) exception: its text only where it is meant for the client.

    An exception this module does not know is a bug or an internal failure: its text (which may hold
    a traceback, paths, pids or addresses) goes to the log, the client gets INTERNAL_ERROR_MESSAGE.
    """
    if isinstance(exc, ApiError):
        return exc.info
    if isinstance(exc, UnknownAdapterError):
        return ErrorInfo(message=unknown_adapter_message(exc.adapter_id), kind="unknown_adapter",
                         error_type="validation", field="adapter_id")
    if isinstance(exc, InvalidRequestError):
        return ErrorInfo(message=str(exc), kind="validation", error_type="validation", field=exc.field)
    if isinstance(exc, OverloadedError):
        return ErrorInfo(message=str(exc), kind="overloaded", error_type="overloaded", field=None,
                         retry_after_s=float(exc.retry_after_s))
    if isinstance(exc, QueueTimeoutError):
        return ErrorInfo(message=str(exc), kind="queue_timeout", error_type="queue_timeout", field=None)
    if isinstance(exc, RequestTimeoutError):
        return ErrorInfo(message=str(exc), kind="request_timeout", error_type="request_timeout", field=None)
    if isinstance(exc, AdapterLoadError):
        return ErrorInfo(message=without_paths(str(exc)), kind="adapter_load", error_type="generation",
                         field="adapter_id")
    if isinstance(exc, NonFiniteOutputError):
        # Not the client's fault but the adapter's: a generation error (TGI 424) naming the adapter
        # (a dynamic adapter's id may be a directory: paths are masked as everywhere else).
        field = "adapter_id" if exc.adapter_id is not None else None
        return ErrorInfo(message=without_paths(str(exc)), kind="generation", error_type="generation", field=field)
    if isinstance(exc, EngineDeadError):  # its text is the step loop's own exception: for the log only
        log.error("request %s: %s", request_id or "-", exc)
        return ErrorInfo(message=ENGINE_STOPPED_MESSAGE, kind="unavailable", error_type="generation", field=None)
    if isinstance(exc, EngineError):
        return ErrorInfo(message=without_paths(str(exc)), kind="generation", error_type="generation", field=None)
    log.error("request %s failed with an unexpected error", request_id or "-", exc_info=exc)
    shown = INTERNAL_ERROR_MESSAGE + (f" (request id {request_id})" if request_id else "")
    return ErrorInfo(message=shown, kind="internal", error_type="internal", field=None)


def status_label(kind: str) -> str:
    """The `status` label of loraserve_requests_total for a failed request."""
    return {"validation": "invalid", "unknown_adapter": "invalid", "overloaded": "overloaded",
            "queue_timeout": "queue_timeout", "request_timeout": "request_timeout"}.get(kind, "error")


def tgi_status(info: ErrorInfo) -> int:
    return _MAP.get(info["kind"], _MAP["generation"])[0]


def tgi_error_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": info["message"], "error_type": _MAP.get(info["kind"], _MAP["generation"])[1]}


# Seconds a client should wait before retrying (the Retry-After header, RFC 9110), by kind, where the
# error itself carries no estimate: a lost model replica is replaced by another, or restarted, within
# seconds; a request that found no capacity within max_queue_wait_s should not be back at once (an
# autoscaled deployment adds a replica within seconds). An OverloadedError carries its own estimate
# (`retry_after_s`: the adapter's queue drain time at its recent admission rate); Serve's own full queue
# (BackPressureError, also a 429) has none, as TGI's 429 has none.
RETRY_AFTER_S: dict[str, float] = {"unavailable": 5, "queue_timeout": 5}


def retry_after_header(info: ErrorInfo) -> str | None:
    """The Retry-After value for an error, whole seconds rounded up (at least 1); None when it has none."""
    seconds = info.get("retry_after_s", RETRY_AFTER_S.get(info["kind"]))
    if seconds is None or not math.isfinite(seconds):
        return None
    return str(max(1, math.ceil(seconds)))


def error_headers(info: ErrorInfo, headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """`headers` plus Retry-After when the error has one (every route's error answer goes through here)."""
    retry_after = retry_after_header(info)
    if retry_after is None:
        return headers
    return {**(headers or {}), "Retry-After": retry_after}


def tgi_error(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(tgi_error_body(info), status_code=tgi_status(info), headers=error_headers(info, headers))


# OpenAI names some fields differently; errors should name the field the client sent.
_OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "adapter_id": "model", "inputs": "prompt",
                  "grammar": "response_format"}


def openai_status(info: ErrorInfo) -> int:
    return _MAP.get(info["kind"], _MAP["generation"])[2]


def openai_error_body(info: ErrorInfo, prompt_field: str = "prompt") -> dict[str, Any]:
    _, _, _, err_type, code = _MAP.get(info["kind"], _MAP["generation"])
    param = info["field"]
    message = info["message"]
    if param is not None:
        renamed = prompt_field if param == "inputs" else _OPENAI_FIELDS.get(param, param)
        if renamed != param:
            message = message.replace(f"{param}:", f"{renamed}:", 1).replace(f"`{param}`", f"`{renamed}`")
        param = renamed
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def openai_error(info: ErrorInfo, prompt_field: str = "prompt") -> JSONResponse:
    return JSONResponse(openai_error_body(info, prompt_field), status_code=openai_status(info),
                        headers=error_headers(info))


def sse(data: Any) -> bytes:
    """One server-sent event carrying JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, allow_nan=False).encode() + b"\n\n"
