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
    """A waiting-queue bound is full for this request's adapter; retry later (HTTP 429, Retry-After).

    Raised at submit, before anything is queued. `retry_after_s` estimates when retrying could
    succeed (the adapter's queue drain time at its recent admission rate); `adapter_id` is the
    adapter refused (None = the base model). `scope` says what is full: "adapter" (this adapter's
    own bound or its share of the queue: other adapters are still admitted) or "replica" (the whole
    waiting queue past its hard limit, a busy grammar compiler: every request is refused alike).
    """

    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0, adapter_id: str | None = None,
                 scope: str = "adapter") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.adapter_id = adapter_id
        self.scope = scope


class QueueTimeoutError(EngineError):
    """The request waited longer than `max_queue_wait_s` without its first token (HTTP 503)."""

    error_type = "queue_timeout"


class RequestTimeoutError(EngineError):
    """The request ran past `request_timeout_s` and was stopped; tokens already sent stand (HTTP 504)."""

    error_type = "request_timeout"


class EngineDeadError(EngineError):
    """The engine's step loop failed; the request cannot complete (HTTP 500)."""

    error_type = "generation"


class AdapterBusyError(EngineError):
    """The adapter is in use by running requests; the operation is refused (HTTP 409)."""

    error_type = "adapter_busy"

    def __init__(self, adapter_id: str, message: str) -> None:
        super().__init__(f"adapter {adapter_id!r}: {message}")
        self.adapter_id = adapter_id


class NonFiniteOutputError(EngineError):
    """The model's logits for this request came out NaN or Inf, in practice because its adapter's weights
    hold NaN/Inf or overflow the dtype. Only this request is stopped (HTTP 424 on TGI routes)."""

    error_type = "generation"

    def __init__(self, adapter_id: str | None) -> None:
        who = "the base model" if adapter_id is None else f"adapter {adapter_id!r}"
        super().__init__(f"{who} produced non-finite logits (NaN or Inf); the request was stopped")
        self.adapter_id = adapter_id


# ---- across a process boundary (engine/engine_process.py) ---------------------------------------
# Pickling an exception re-runs its __init__ with `args`, which fails for the classes above that take
# other arguments than their message; so an error crosses as (class name, message, attributes) and is
# rebuilt without calling __init__. Classes outside this set arrive as RuntimeError: an unexpected
# failure, whose text the server logs and never shows a client (serve_app/errors.py error_info).
_WIRE_CLASSES: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (EngineError, InvalidRequestError, UnknownAdapterError, AdapterLoadError, OverloadedError,
                QueueTimeoutError, RequestTimeoutError, EngineDeadError, AdapterBusyError, NonFiniteOutputError,
                PermissionError, FileNotFoundError, ValueError, KeyError, TimeoutError, RuntimeError, AssertionError)
}
_WIRE_ATTRS = ("field", "adapter_id", "retry_after_s", "scope")


def error_to_wire(exc: BaseException) -> tuple[str, str, dict[str, object]]:
    """`exc` as plain data: (class name, message, the attributes the server reads)."""
    # The nearest known class: a subclass (an OSError of the Hub client, say) crosses as its base.
    name = next((c.__name__ for c in type(exc).__mro__ if _WIRE_CLASSES.get(c.__name__) is c), RuntimeError.__name__)
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return name, message, {a: getattr(exc, a) for a in _WIRE_ATTRS if hasattr(exc, a)}


def error_from_wire(wire: tuple[str, str, dict[str, object]]) -> BaseException:
    """The exception `error_to_wire` described: same class, message and attributes."""
    name, message, attrs = wire
    cls = _WIRE_CLASSES.get(name, RuntimeError)
    exc = cls.__new__(cls)
    BaseException.__init__(exc, message)
    for key, value in attrs.items():
        setattr(exc, key, value)
    return exc
