"""The two Ray Serve deployments: the HTTP ingress and the model replica that owns an Engine.

```
proxy ─▶ Ingress (Starlette app, num_cpus=0) ──DeploymentHandle──▶ ModelReplica (Engine)
                                              stream=True for SSE     one per GPU / CPU slot
```
The ingress holds no model state; it parses and validates HTTP, sends plain-dict engine requests
over the handle (streaming ones as a Serve streaming generator), and maps results to TGI/OpenAI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.types import ASGIApp

from models.resolve import resolve_model
from serve_app.admin import AdminConfig
from serve_app.admission_gate import DEFAULT_HOLD_S, AdmissionGate, GatedBackend
from serve_app.autoscaling import engine_load_stats
from serve_app.core import DEFAULT_STREAM_MESSAGES_PER_S, ReplicaCore
from serve_app.engine_request import EngineRequest
from serve_app.errors import ApiError
from serve_app.handle_errors import HandleFailure, handle_failure, timeout_failure
from serve_app.http_app import create_app
from serve_app.http_guards import DEFAULT_MAX_BODY_BYTES
from serve_app.settings import DEFAULT_REQUEST_TIMEOUT_S, engine_config_from_dict
from serve_app.stats_keys import DEVICE_ADAPTERS, ENGINE_LOAD

log = logging.getLogger("serve_app")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return uuid.uuid4().hex[:8]


# Health checks: a crashed replica process fails its next check at once, so the period is how long
# the controller takes to notice (and start a replacement); 2 s instead of Serve's 10. The timeout is
# for a replica that hangs: its check runs on the replica's event loop, which a busy engine thread on
# a loaded CPU can slow to seconds, and 3 misses in a row restart it, so it stays generous (Serve: 30).
@serve.deployment(name="ModelReplica", health_check_period_s=2, health_check_timeout_s=15,
                  graceful_shutdown_timeout_s=10)
class ModelReplica:
    """Owns one Engine (base model once + adapter slots + KV cache) and serves dict requests."""

    def __init__(self, engine_config: dict[str, Any], model: str, served_name: str | None,
                 options: dict[str, Any] | None = None) -> None:
        import torch

        options = options or {}
        if options.get("torch_threads"):
            # Ray sets OMP_NUM_THREADS from num_cpus; make torch follow the configured count exactly.
            torch.set_num_threads(int(options["torch_threads"]))
        # Resolve again here (idempotent, cached): the builder may have run on another node, and the
        # demo model must exist on the node this replica landed on.
        resolved = resolve_model(model, served_name)
        config = engine_config_from_dict(engine_config)
        extra = tuple(a for a in config.adapters if a.adapter_id not in {r.adapter_id for r in resolved.adapters})
        config = replace(config, model=resolved.path, adapters=resolved.adapters + extra)
        rate = float(options.get("stream_messages_per_s", DEFAULT_STREAM_MESSAGES_PER_S))
        threads = options.get("torch_threads")
        self.core = ReplicaCore(config, resolved.served_name, _replica_id(), stream_messages_per_s=rate,
                                max_input_chars=options.get("max_input_chars"),
                                engine_process=bool(options.get("engine_process", False)),
                                torch_threads=int(threads) if threads else None)
        log.info("model replica %s ready: %s with %d adapters", self.core.replica_id, resolved.path,
                 len(config.adapters))

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        return await self.core.generate(req)

    async def generate_stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        # aclosing: if Serve closes this generator (caller cancelled), close the inner one now so the
        # engine request is aborted immediately rather than when the generator is garbage-collected.
        async with contextlib.aclosing(self.core.stream(req)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def info(self) -> dict[str, Any]:
        return self.core.info()

    async def health(self) -> dict[str, Any]:
        return self.core.health()

    async def admin(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Adapter admin on this replica (serve_app/admin.py); the ingress broadcasts it to all replicas."""
        return await self.core.admin(op, payload)

    async def snapshot(self) -> dict[str, Any]:
        # Plus the device-resident adapters: tests and load reports check affinity routing with it.
        stats = self.core.engine.stats()
        return {**self.core.snapshot(stats), DEVICE_ADAPTERS: list(stats.adapters.device_adapters)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (serve_app/autoscaling.py): the engine's load over all
        adapters, KV usage and the oldest queued request's age. Serve calls this on the replica's
        loop every `metrics_interval_s`; Engine.stats() only takes the engine lock briefly."""
        stats = self.core.engine.stats()
        return engine_load_stats(stats.as_dict(), stats.oldest_waiting_age_s)

    def record_routing_stats(self) -> dict[str, Any]:
        """What AdapterAffinityRouter (serve_app/router.py) routes on: device-resident adapters + load."""
        stats = self.core.engine.stats()
        return {DEVICE_ADAPTERS: list(stats.adapters.device_adapters), ENGINE_LOAD: float(stats.load)}

    def check_health(self) -> None:
        """Serve's periodic health check: a dead step loop gets this replica restarted."""
        if not self.core.engine.is_alive():
            raise RuntimeError("engine step loop is not running")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.core.shutdown()


class HandleBackend:
    """The Backend (serve_app/backends.py) over a DeploymentHandle to ModelReplica.

    Every call is bounded by `request_timeout_s` (serve_app/settings.py): a non-streamed request
    must be answered within it, a stream must deliver its first chunk and then each next chunk
    within it. Serve's handle queues a request while no replica can take it (all restarting, say)
    and would wait without bound; on the deadline the call is cancelled and the client gets 503.
    Failures of the handle call are mapped by serve_app/handle_errors.py (plain messages, no
    actor ids, pids or tracebacks); the details are logged here.

    A request whose replica died before it returned anything (a non-streamed request, or a stream
    before its first chunk) is sent again, once, when a probe of the other replicas finds a healthy
    one: the client has seen nothing of it yet and nothing of it survives on the dead replica, so
    the second attempt is invisible except for latency. Not retried: a stream after its first chunk
    (the client already has tokens; it gets an in-band error event), a timeout (the replica may
    still be working on it), overload and every other failure; and not when no healthy replica
    answers the probe (a single replica restarting): then the client gets 503 at once rather than
    waiting out the restart.
    """

    # Per-adapter handles kept (handle.options() builds a new handle object each call); beyond this
    # many distinct adapters the rest get a fresh one per request.
    MAX_CACHED_HANDLES = 4096
    # The probe for a healthy replica before a retry: how long it may take, and how long its answer
    # is reused (a dead replica fails all its requests at once: one probe answers them all).
    PROBE_TIMEOUT_S = 3.0
    PROBE_TTL_S = 1.0
    CONTROL_TIMEOUT_S = 10.0  # info, health and metrics calls: answer quickly or report the replicas down

    def __init__(self, handle: DeploymentHandle, tag_adapter: bool = False,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.handle = handle
        self.stream_handle = handle.options(stream=True)
        # With adapter-affinity routing (serve_app/router.py) each call carries its adapter id as the
        # handle's multiplexed_model_id: the router reads it from the request metadata. Off with
        # Serve's default router, whose multiplexing logic would wait for replicas to report the id.
        self.tag_adapter = tag_adapter
        self.request_timeout_s = float(request_timeout_s)
        self._tagged: dict[tuple[str, bool], DeploymentHandle] = {}
        self._probe: asyncio.Future[bool] | None = None
        self._probe_at = -math.inf

    def _handle_for(self, req: EngineRequest, stream: bool) -> DeploymentHandle:
        base = self.stream_handle if stream else self.handle
        adapter = req.get("adapter_id")
        if not self.tag_adapter or not adapter:
            return base
        key = (str(adapter), stream)
        handle = self._tagged.get(key)
        if handle is None:
            handle = base.options(multiplexed_model_id=str(adapter))
            if len(self._tagged) < self.MAX_CACHED_HANDLES:
                self._tagged[key] = handle
        return handle

    @staticmethod
    async def _await(response: DeploymentResponse, timeout_s: float) -> Any:
        """The response's result within `timeout_s` (asyncio.TimeoutError otherwise). Cancelled or timed
        out, the replica call is cancelled too (which aborts the request in the engine)."""
        try:
            return await asyncio.wait_for(response, timeout=max(0.0, timeout_s))
        except (asyncio.CancelledError, asyncio.TimeoutError):
            response.cancel()
            raise

    def _failed(self, what: str, req: EngineRequest | None, exc: BaseException, failure: HandleFailure,
                retry: bool = False) -> None:
        """Log a failed handle call with everything the client is not told."""
        request_id = (req or {}).get("request_id", "-")
        outcome = "retrying once on another replica" if retry else f"answering {failure.info['kind']}"
        # A RayTaskError's text carries the replica-side traceback; Ray's own errors name the actor.
        log.warning("%s %s failed (%s); %s: %s", what, request_id, outcome, type(exc).__name__, exc)

    async def _retry_elsewhere(self, failure: HandleFailure, deadline: float) -> bool:
        """Whether a failed request should be sent again (see the class docstring)."""
        remaining = deadline - asyncio.get_running_loop().time()
        return failure.replica_lost and remaining > 0 and await self._healthy_replica(min(remaining, self.PROBE_TIMEOUT_S))

    async def _healthy_replica(self, timeout_s: float) -> bool:
        """Whether some live replica answers its health call now (one probe shared by concurrent callers)."""
        now = asyncio.get_running_loop().time()
        if self._probe is None or now - self._probe_at > self.PROBE_TTL_S:
            self._probe_at = now
            self._probe = asyncio.ensure_future(self._probe_health(timeout_s))
        return await asyncio.shield(self._probe)

    async def _probe_health(self, timeout_s: float) -> bool:
        try:
            results = await self.handle.broadcast("health").results_async(timeout_s=timeout_s, return_exceptions=True)
        except Exception:  # no replica known to the router, a timeout, or no broadcast in this Serve
            return False
        return any(isinstance(r, dict) and r.get("ok") for r in results)

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s  # for both attempts together
        retried = False
        while True:
            try:
                return await self._await(self._handle_for(req, stream=False).generate.remote(req),
                                         deadline - loop.time())
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError as exc:
                failure = timeout_failure(self.request_timeout_s)
                self._failed("request", req, exc, failure)
                return {"error": failure.info}
            except Exception as exc:
                failure = handle_failure(exc)
                retry = not retried and await self._retry_elsewhere(failure, deadline)
                self._failed("request", req, exc, failure, retry)
                if not retry:
                    return {"error": failure.info}
                retried = True

    async def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        """Chunks from the replica; a failure ends the stream with an {"error": ErrorInfo} item."""
        loop = asyncio.get_running_loop()
        # The first chunk (over both attempts) by this deadline; each next one within the timeout of
        # asking for it (not of the last chunk: a slow-reading client must not time its stream out).
        first_deadline = loop.time() + self.request_timeout_s
        for attempt in (1, 2):
            gen: DeploymentResponseGenerator | None = None
            delivered = done = False
            try:
                gen = self._handle_for(req, stream=True).generate_stream.remote(req)
                while not done:
                    wait_s = self.request_timeout_s if delivered else first_deadline - loop.time()
                    try:
                        chunk = await asyncio.wait_for(gen.__anext__(), timeout=max(0.0, wait_s))
                    except StopAsyncIteration:
                        done = True  # ended without a final delta: the HTTP layer reports it incomplete
                        return
                    done = bool(chunk) and bool(chunk[-1].get("finished") or "error" in chunk[-1])
                    delivered = True
                    yield chunk
                return
            except asyncio.TimeoutError as exc:
                failure = timeout_failure(self.request_timeout_s)
                self._failed("stream", req, exc, failure)
            except Exception as exc:
                failure = handle_failure(exc)
                retry = not delivered and attempt == 1 and await self._retry_elsewhere(failure, first_deadline)
                self._failed("stream", req, exc, failure, retry)
                if retry:
                    continue
            finally:
                if gen is not None and not done:
                    # Closed early (client disconnected), failed or timed out: cancel the replica's
                    # generator, which closes the engine stream and aborts the request there.
                    gen.cancel()
            yield [{"error": failure.info}]
            return

    async def _control(self, response: DeploymentResponse, timeout_s: float) -> Any:
        """A control call's result (info, health, a snapshot), or ApiError with a plain message."""
        try:
            return await self._await(response, timeout_s)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError as exc:
            failure = timeout_failure(timeout_s)
            self._failed("control call", None, exc, failure)
        except Exception as exc:
            failure = handle_failure(exc)
            self._failed("control call", None, exc, failure)
        raise ApiError(failure.info["message"], kind=failure.info["kind"])

    async def info(self) -> dict[str, Any]:
        return await self._control(self.handle.info.remote(), min(self.CONTROL_TIMEOUT_S, self.request_timeout_s))

    async def health(self) -> dict[str, Any]:
        return await self._control(self.handle.health.remote(), min(self.CONTROL_TIMEOUT_S, self.request_timeout_s))

    async def snapshots(self) -> list[dict[str, Any]]:
        """One snapshot from every live replica (Serve broadcast), not just one the router picks."""
        try:
            results = await self.handle.broadcast("snapshot").results_async(
                timeout_s=self.CONTROL_TIMEOUT_S, return_exceptions=True)
        except Exception:  # broadcast is an alpha API: fall back to whichever replica answers
            log.warning("broadcast failed; /metrics shows one replica", exc_info=True)
            results = [await self._control(self.handle.snapshot.remote(), self.CONTROL_TIMEOUT_S)]
        return [r for r in results if isinstance(r, dict)]

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Every live replica runs the admin op (a broadcast: each holds its own adapter tiers).

        A replica that fails or times out is reported as an error entry, not dropped, so the caller
        sees which replicas did not apply the change. Loads may download from the Hub: long timeout.
        """
        timeout = 600.0 if op == "load" else 30.0
        try:
            results = await self.handle.broadcast("admin", op, payload).results_async(
                timeout_s=timeout, return_exceptions=True)
        except Exception as exc:
            failure = handle_failure(exc)
            self._failed(f"admin {op}", None, exc, failure)
            raise ApiError(failure.info["message"], kind=failure.info["kind"]) from None
        return [r if isinstance(r, dict) else self._admin_failure(i, op, r) for i, r in enumerate(results)]

    def _admin_failure(self, index: int, op: str, exc: BaseException) -> dict[str, Any]:
        failure = handle_failure(exc)
        self._failed(f"admin {op}", None, exc, failure)
        kind = "unavailable" if failure.info["kind"] == "unavailable" else "error"
        return {"replica": f"#{index}", "error": {"kind": kind, "message": failure.info["message"]}}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """HTTP entry point. The Starlette app is built in the replica (late-bound `__serve_build_asgi_app__`)
    because its routes need this replica's DeploymentHandle; FastAPI's class-based views would add a
    second validation layer whose 422 bodies are not TGI's or OpenAI's error shapes."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 affinity_routing: bool = False, admin: AdminConfig | None = None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, refusal_hold_s: float = DEFAULT_HOLD_S) -> None:
        handle = HandleBackend(model, tag_adapter=affinity_routing, request_timeout_s=request_timeout_s)
        self.backend = GatedBackend(handle, AdmissionGate(hold_s=refusal_hold_s))
        self.max_body_bytes = max_body_bytes
        self.admin = admin or AdminConfig()  # validated again here: enabled without a token refuses to start

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_app(self.backend, max_body_bytes=self.max_body_bytes, ingress_id=_replica_id(),
                          admin=self.admin)
