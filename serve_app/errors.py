"""Errors as data: one shape between replica and ingress, then TGI's or OpenAI's shape on the wire.

Engine exceptions do not cross the Ray boundary as exceptions: `InvalidRequestError(field, message)`
has a custom constructor, and Ray's re-raised `RayTaskError` wrappers would hide the type. The
replica turns each into an `ErrorInfo` dict instead, and the ingress maps its `kind` to a status.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from starlette.responses import JSONResponse

from engine import (
    AdapterBusyError,
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
    kind: str  # a key of KINDS: what went wrong, and so how each API answers it
    field: str | None
    retry_after_s: NotRequired[float]  # the engine's own estimate (OverloadedError); else KINDS[kind].retry_after_s
    # OverloadedError's scope: "adapter" (only this adapter is refused now) or "replica" (everyone is);
    # the ingress's admission gate holds back only the former (serve_app/admission_gate.py).
    scope: NotRequired[str]


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of error is answered: TGI's status and error_type (the admin API answers in TGI's
    shape too), OpenAI's status, type and code, the `status` label of loraserve_requests_total, and
    the Retry-After seconds when the error itself carries no estimate."""

    status: int
    error_type: str
    openai_status: int
    openai_type: str
    openai_code: str | None = None
    metric_status: str = "error"
    retry_after_s: float | None = None
    admin_type: str | None = None  # the admin API's error_type, where it names the failure more precisely


_CLIENT = "invalid_request_error"
# The one table of error kinds. Retry-After: a lost model replica is replaced by another, or
# restarted, within seconds; a request that found no capacity within max_queue_wait_s should not be
# back at once (an autoscaled deployment adds a replica within seconds). An OverloadedError carries
# its own estimate (`retry_after_s`: the adapter's queue drain time at its recent admission rate);
# Serve's own full queue (BackPressureError, also a 429) has none, as TGI's 429 has none.
KINDS: dict[str, ErrorKind] = {
    "validation": ErrorKind(422, "validation", 400, _CLIENT, metric_status="invalid"),
    "unknown_adapter": ErrorKind(422, "validation", 404, _CLIENT, "model_not_found", metric_status="invalid"),
    "not_found": ErrorKind(404, "not_found", 404, _CLIENT),
    "method": ErrorKind(405, "validation", 405, _CLIENT),
    "too_large": ErrorKind(413, "validation", 413, _CLIENT),
    "unsupported_media": ErrorKind(415, "validation", 415, _CLIENT),
    "overloaded": ErrorKind(429, "overloaded", 429, "rate_limit_error", "rate_limit_exceeded",
                            metric_status="overloaded"),
    # No first token within max_queue_wait_s: the replica is saturated, not the client's adapter over its
    # share (that is a 429 at arrival); 503 + Retry-After as for any server-side capacity problem.
    "queue_timeout": ErrorKind(503, "queue_timeout", 503, "server_error", "queue_timeout",
                               metric_status="queue_timeout", retry_after_s=5),
    # Stopped at the engine's request_timeout_s (tokens already streamed stand): a gateway-style timeout.
    "request_timeout": ErrorKind(504, "request_timeout", 504, "server_error", "request_timeout",
                                 metric_status="request_timeout"),
    "adapter_load": ErrorKind(424, "generation", 500, "server_error", "adapter_load_failed", admin_type="adapter_load"),
    "generation": ErrorKind(424, "generation", 500, "server_error"),
    "incomplete": ErrorKind(500, "incomplete_generation", 500, "server_error"),
    "unavailable": ErrorKind(503, "unhealthy", 503, "server_error", retry_after_s=5),
    "internal": ErrorKind(500, "internal", 500, "server_error", "internal_error"),
    # What an adapter admin operation on a replica failed with (admin_kind; serve_app/admin.py).
    "busy": ErrorKind(409, "adapter_busy", 409, _CLIENT),
    "unknown": ErrorKind(404, "not_found", 404, _CLIENT),
    "forbidden": ErrorKind(403, "forbidden", 403, _CLIENT),
    "error": ErrorKind(500, "admin", 500, "server_error"),
}


def kind_of(info: ErrorInfo) -> ErrorKind:
    """The table row of an error (an unknown kind, from a newer replica, is answered as a generation error)."""
    return KINDS.get(info["kind"], KINDS["generation"])


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
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.info = ErrorInfo(message=message, kind=kind, field=field)


def error_info(exc: BaseException, request_id: str | None = None) -> ErrorInfo:
    """The ErrorInfo for an engine (or any) exception: its text only where it is meant for the client.

    An exception this module does not know is a bug or an internal failure: its text (which may hold
    a traceback, paths, pids or addresses) goes to the log, the client gets INTERNAL_ERROR_MESSAGE.
    """
    if isinstance(exc, ApiError):
        return exc.info
    if isinstance(exc, UnknownAdapterError):
        return ErrorInfo(message=unknown_adapter_message(exc.adapter_id), kind="unknown_adapter",
                         field="adapter_id")
    if isinstance(exc, InvalidRequestError):
        return ErrorInfo(message=str(exc), kind="validation", field=exc.field)
    if isinstance(exc, OverloadedError):
        return ErrorInfo(message=str(exc), kind="overloaded", field=None, retry_after_s=float(exc.retry_after_s),
                         scope=exc.scope)
    if isinstance(exc, QueueTimeoutError):
        return ErrorInfo(message=str(exc), kind="queue_timeout", field=None)
    if isinstance(exc, RequestTimeoutError):
        return ErrorInfo(message=str(exc), kind="request_timeout", field=None)
    if isinstance(exc, AdapterLoadError):
        return ErrorInfo(message=without_paths(str(exc)), kind="adapter_load", field="adapter_id")
    if isinstance(exc, NonFiniteOutputError):
        # Not the client's fault but the adapter's: a generation error (TGI 424) naming the adapter
        # (a dynamic adapter's id may be a directory: paths are masked as everywhere else).
        field = "adapter_id" if exc.adapter_id is not None else None
        return ErrorInfo(message=without_paths(str(exc)), kind="generation", field=field)
    if isinstance(exc, EngineDeadError):  # its text is the step loop's own exception: for the log only
        log.error("request %s: %s", request_id or "-", exc)
        return ErrorInfo(message=ENGINE_STOPPED_MESSAGE, kind="unavailable", field=None)
    if isinstance(exc, EngineError):
        return ErrorInfo(message=without_paths(str(exc)), kind="generation", field=None)
    log.error("request %s failed with an unexpected error", request_id or "-", exc_info=exc)
    shown = INTERNAL_ERROR_MESSAGE + (f" (request id {request_id})" if request_id else "")
    return ErrorInfo(message=shown, kind="internal", field=None)


def status_label(kind: str) -> str:
    """The `status` label of loraserve_requests_total for a failed request."""
    return KINDS[kind].metric_status if kind in KINDS else "error"


def admin_kind(exc: BaseException) -> str:
    """The error kind of an adapter admin operation that raised `exc` on a replica (ReplicaCore.admin)."""
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


def admin_status(kind: str) -> tuple[int, str]:
    """The admin API's status and error_type for a replica's admin error kind."""
    row = KINDS.get(kind, KINDS["error"])
    return row.status, row.admin_type or row.error_type


def tgi_status(info: ErrorInfo) -> int:
    return kind_of(info).status


def tgi_error_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": info["message"], "error_type": kind_of(info).error_type}


def retry_after_header(info: ErrorInfo) -> str | None:
    """The Retry-After value for an error, whole seconds rounded up (at least 1); None when it has none."""
    seconds = info.get("retry_after_s", kind_of(info).retry_after_s)
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
    return kind_of(info).openai_status


def openai_error_body(info: ErrorInfo, prompt_field: str = "prompt") -> dict[str, Any]:
    row = kind_of(info)
    param = info["field"]
    message = info["message"]
    if param is not None:
        renamed = prompt_field if param == "inputs" else _OPENAI_FIELDS.get(param, param)
        if renamed != param:
            message = message.replace(f"{param}:", f"{renamed}:", 1).replace(f"`{param}`", f"`{renamed}`")
        param = renamed
    return {"error": {"message": message, "type": row.openai_type, "param": param, "code": row.openai_code}}


def openai_error(info: ErrorInfo, prompt_field: str = "prompt") -> JSONResponse:
    return JSONResponse(openai_error_body(info, prompt_field), status_code=openai_status(info),
                        headers=error_headers(info))
