"""What an exception out of a DeploymentHandle call means for the client: one ErrorInfo, no internals.

Ray's exceptions carry actor ids, pids, node addresses and remote tracebacks in their text, so none
of it may reach a response: each failure becomes a plain message and an error kind (the HTTP status
comes from serve_app/errors.py), and the details go to the ingress's log instead.

| raised by the handle | kind | HTTP (TGI / OpenAI) |
| --- | --- | --- |
| BackPressureError (Serve's `max_queued_requests`) | overloaded | 429 |
| the replica died or became unreachable: RayActorError (ActorDiedError, ActorUnavailableError), WorkerCrashedError, NodeDiedError, ObjectLostError, ReplicaUnavailableError, a RayTaskError wrapping one of these | unavailable, `replica_lost` | 503 + Retry-After |
| DeploymentUnavailableError (the deployment failed to deploy), TaskCancelledError / RequestCancelledError the client did not ask for (the replica is shutting down), a timeout, any other Ray or Serve error | unavailable | 503 + Retry-After |
| RayTaskError wrapping anything else (raised in the replica's code) | what `error_info` makes of it (an engine error's own plain message; anything else: internal, logged) | |
| any other exception | the same | |

`replica_lost` marks failures after which the same request may succeed on another replica: the
replica process is gone, so nothing of the request survives there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)

from serve_app.errors import ApiError, ErrorInfo, error_info

REPLICA_LOST_MESSAGE = "the model replica serving this request stopped before it finished; retry the request"
DEPLOYMENT_DOWN_MESSAGE = "the model is not available right now (its replicas failed to start); retry later"
CANCELLED_MESSAGE = "the model replica cancelled this request (it is shutting down); retry the request"
UNAVAILABLE_MESSAGE = "the model replicas could not be reached; retry later"
OVERLOADED_MESSAGE = "the model replicas' queues are full; retry later"

# Exceptions meaning the replica (its process, its node or its object store) is gone.
_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ReplicaUnavailableError)


@dataclass(frozen=True)
class HandleFailure:
    """A failed handle call as the client sees it, and whether another replica may serve it instead."""

    info: ErrorInfo
    replica_lost: bool = False


def _failure(message: str, kind: str, replica_lost: bool = False) -> HandleFailure:
    return HandleFailure(ApiError(message, kind=kind).info, replica_lost)


def timeout_failure(timeout_s: float) -> HandleFailure:
    """No answer from a model replica within the request timeout (settings' `request_timeout_s`)."""
    return _failure(f"no model replica answered within {timeout_s:g} s; retry later", "unavailable")


def handle_failure(exc: BaseException) -> HandleFailure:
    """The client-facing failure for an exception raised by awaiting a handle call (never CancelledError:
    the caller's own cancellation is re-raised, not mapped)."""
    if isinstance(exc, RayTaskError):
        # Raised in the replica's code; `cause` is the original exception (the text also has the
        # remote traceback). A lost actor can surface wrapped too (a chained call's dependency).
        cause = exc.cause
        if isinstance(cause, _LOST):
            return _failure(REPLICA_LOST_MESSAGE, "unavailable", replica_lost=True)
        return HandleFailure(error_info(cause))
    if isinstance(exc, BackPressureError):
        return _failure(OVERLOADED_MESSAGE, "overloaded")
    if isinstance(exc, _LOST):
        return _failure(REPLICA_LOST_MESSAGE, "unavailable", replica_lost=True)
    if isinstance(exc, DeploymentUnavailableError):
        return _failure(DEPLOYMENT_DOWN_MESSAGE, "unavailable")
    if isinstance(exc, TaskCancelledError):  # RequestCancelledError too
        return _failure(CANCELLED_MESSAGE, "unavailable")
    if isinstance(exc, RayError | RayServeException | TimeoutError):  # GetTimeoutError, broadcast timeouts
        return _failure(UNAVAILABLE_MESSAGE, "unavailable")
    return HandleFailure(error_info(exc))
