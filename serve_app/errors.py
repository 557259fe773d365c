"""Errors as data: one shape between replica and ingress, then TGI's or OpenAI's shape on the wire.

Engine exceptions do not cross the Ray boundary as exceptions: `InvalidRequestError(field, message)`
has a custom constructor, and Ray's re-raised `RayTaskError` wrappers would hide the type. The
replica turns each into an `ErrorInfo` dict instead, and the ingress maps its `kind` to a status.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict

from starlette.responses import JSONResponse

from engine.errors import (
    AdapterLoadError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    UnknownAdapterError,
)


class ErrorInfo(TypedDict):
    message: str
    kind: str  # validation | unknown_adapter | overloaded | adapter_load | generation | unavailable | not_found
    error_type: str  # TGI's error_type
    field: str | None


# kind -> (TGI status, TGI error_type, OpenAI status, OpenAI type, OpenAI code)
_MAP: dict[str, tuple[int, str, int, str, str | None]] = {
    "validation": (422, "validation", 400, "invalid_request_error", None),
    "unknown_adapter": (422, "validation", 404, "invalid_request_error", "model_not_found"),
    "not_found": (404, "not_found", 404, "invalid_request_error", None),
    "method": (405, "validation", 405, "invalid_request_error", None),
    "too_large": (413, "validation", 413, "invalid_request_error", None),
    "overloaded": (429, "overloaded", 429, "rate_limit_error", "rate_limit_exceeded"),
    "adapter_load": (424, "generation", 500, "server_error", "adapter_load_failed"),
    "generation": (424, "generation", 500, "server_error", None),
    "incomplete": (500, "incomplete_generation", 500, "server_error", None),
    "unavailable": (503, "unhealthy", 503, "server_error", None),
}


class ApiError(Exception):
    """Raised by request parsing in the ingress; carries the same fields as ErrorInfo."""

    def __init__(self, message: str, *, field: str | None = None, kind: str = "validation") -> None:
        super().__init__(message)
        self.info = ErrorInfo(message=message, kind=kind, error_type=_MAP[kind][1], field=field)


def error_info(exc: BaseException) -> ErrorInfo:
    """The ErrorInfo for an engine (or any) exception."""
    if isinstance(exc, ApiError):
        return exc.info
    if isinstance(exc, UnknownAdapterError):
        return ErrorInfo(message=str(exc), kind="unknown_adapter", error_type="validation", field="adapter_id")
    if isinstance(exc, InvalidRequestError):
        return ErrorInfo(message=str(exc), kind="validation", error_type="validation", field=exc.field)
    if isinstance(exc, OverloadedError):
        return ErrorInfo(message=str(exc), kind="overloaded", error_type="overloaded", field=None)
    if isinstance(exc, AdapterLoadError):
        return ErrorInfo(message=str(exc), kind="adapter_load", error_type="generation", field="adapter_id")
    if isinstance(exc, EngineDeadError):
        return ErrorInfo(message=str(exc), kind="unavailable", error_type="generation", field=None)
    if isinstance(exc, EngineError):
        return ErrorInfo(message=str(exc), kind="generation", error_type="generation", field=None)
    return ErrorInfo(message=f"{type(exc).__name__}: {exc}", kind="generation", error_type="generation", field=None)


def status_label(kind: str) -> str:
    """The `status` label of loraserve_requests_total for a failed request."""
    return {"validation": "invalid", "unknown_adapter": "invalid", "overloaded": "overloaded"}.get(kind, "error")


def tgi_status(info: ErrorInfo) -> int:
    return _MAP.get(info["kind"], _MAP["generation"])[0]


def tgi_error_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": info["message"], "error_type": _MAP.get(info["kind"], _MAP["generation"])[1]}


def tgi_error(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(tgi_error_body(info), status_code=tgi_status(info), headers=headers)


# OpenAI names some fields differently; errors should name the field the client sent.
_OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "adapter_id": "model", "inputs": "prompt"}


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
    return JSONResponse(openai_error_body(info, prompt_field), status_code=openai_status(info))


def sse(data: Any) -> bytes:
    """One server-sent event carrying JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, allow_nan=False).encode() + b"\n\n"
