"""Typed errors the engine raises; the server maps each class to one HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. `error_type` is the short machine-readable kind (TGI's `error_type`)."""

    error_type = "generation"


class InvalidRequestError(EngineError, ValueError):
    """Bad input from the caller: names the field, the value and what is allowed (HTTP 422/400)."""

    error_type = "validation"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownAdapterError(InvalidRequestError):
    """The request names an adapter the engine does not serve (HTTP 422/404)."""

    def __init__(self, adapter_id: str, available: list[str]) -> None:
        shown = ", ".join(sorted(available)[:20]) or "(none)"
        more = f" and {len(available) - 20} more" if len(available) > 20 else ""
        super().__init__("adapter_id", f"unknown adapter {adapter_id!r}; available: {shown}{more}")
        self.adapter_id = adapter_id


class AdapterLoadError(EngineError):
    """An adapter could not be loaded or does not fit the base model (HTTP 422/424)."""

    error_type = "adapter_load"

    def __init__(self, adapter_id: str, message: str) -> None:
        super().__init__(f"adapter {adapter_id!r}: {message}")
        self.adapter_id = adapter_id


class OverloadedError(EngineError):
    """The bounded waiting queue is full; retry later (HTTP 429)."""

    error_type = "overloaded"


class EngineDeadError(EngineError):
    """The engine's step loop failed; the request cannot complete (HTTP 500)."""

    error_type = "generation"


class AdapterBusyError(EngineError):
    """The adapter is in use by running requests; the operation is refused (HTTP 409)."""

    error_type = "adapter_busy"

    def __init__(self, adapter_id: str, message: str) -> None:
        super().__init__(f"adapter {adapter_id!r}: {message}")
        self.adapter_id = adapter_id
