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
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.types import ASGIApp

from serve_app.admin import AdminConfig
from serve_app.autoscaling import engine_load_stats
from serve_app.core import DEFAULT_STREAM_MESSAGES_PER_S, EngineRequest, ReplicaCore, engine_alive
from serve_app.demo import resolve_model
from serve_app.errors import ApiError
from serve_app.http_app import create_app
from serve_app.router import STATS_ADAPTERS, STATS_LOAD
from serve_app.settings import engine_config_from_dict

log = logging.getLogger("serve_app")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return uuid.uuid4().hex[:8]


@serve.deployment(name="ModelReplica", health_check_period_s=10, graceful_shutdown_timeout_s=10)
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
        self.core = ReplicaCore(config, resolved.served_name, _replica_id(), stream_messages_per_s=rate)
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
        return {**self.core.snapshot(), STATS_ADAPTERS: device_adapters(self.core.engine)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (serve_app/autoscaling.py): the engine's load over all
        adapters, KV usage and the oldest queued request's age. Serve calls this on the replica's
        loop every `metrics_interval_s`; Engine.stats() only takes the engine lock briefly."""
        return engine_load_stats(self.core.engine.stats(), oldest_waiting_age_s(self.core.engine))

    def record_routing_stats(self) -> dict[str, Any]:
        """What AdapterAffinityRouter (serve_app/router.py) routes on: device-resident adapters + load."""
        stats = self.core.engine.stats()
        return {STATS_ADAPTERS: device_adapters(self.core.engine),
                STATS_LOAD: float(stats.get("num_running", 0)) + float(stats.get("num_waiting", 0))}

    def check_health(self) -> None:
        """Serve's periodic health check: a dead step loop gets this replica restarted."""
        if not engine_alive(self.core.engine):
            raise RuntimeError("engine step loop is not running")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.core.shutdown()


def device_adapters(engine: Any) -> list[str]:
    """Ids of the adapters in the engine's device slots (tier "device" in Engine.adapter_info())."""
    return sorted(str(a["id"]) for a in engine.adapter_info() if a.get("tier") == "device")


def oldest_waiting_age_s(engine: Any) -> float:
    """Age of the oldest request still waiting in the engine's adapter queues (0 when none).

    Read without the engine lock: a queue mutated meanwhile at worst gives a slightly stale age,
    which is fine for an autoscaling signal and keeps the step loop from ever waiting on this.
    """
    try:
        queues = list(engine.scheduler.queues.values())
        arrivals = [q[0].arrival for q in queues if q]
    except (RuntimeError, IndexError, AttributeError):  # mutated while read / engine without queues
        return 0.0
    return max(0.0, time.monotonic() - min(arrivals)) if arrivals else 0.0


class HandleBackend:
    """The Backend (serve_app/backends.py) over a DeploymentHandle to ModelReplica."""

    # Per-adapter handles kept (handle.options() builds a new handle object each call); beyond this
    # many distinct adapters the rest get a fresh one per request.
    MAX_CACHED_HANDLES = 4096

    def __init__(self, handle: DeploymentHandle, tag_adapter: bool = False) -> None:
        self.handle = handle
        self.stream_handle = handle.options(stream=True)
        # With adapter-affinity routing (serve_app/router.py) each call carries its adapter id as the
        # handle's multiplexed_model_id: the router reads it from the request metadata. Off with
        # Serve's default router, whose multiplexing logic would wait for replicas to report the id.
        self.tag_adapter = tag_adapter
        self._tagged: dict[tuple[str, bool], DeploymentHandle] = {}

    def _handle_for(self, req: EngineRequest, stream: bool) -> DeploymentHandle:
        base = self.stream_handle if stream else self.handle
        adapter = req.get("model")
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
    async def _await(response: DeploymentResponse) -> Any:
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the client went away: cancel the replica call (aborts the request)
            raise
        except BackPressureError as exc:
            raise ApiError(f"the model replicas' queues are full; retry later ({exc})", kind="overloaded") from exc

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        return await self._await(self._handle_for(req, stream=False).generate.remote(req))

    async def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        gen = self._handle_for(req, stream=True).generate_stream.remote(req)
        done = False
        try:
            async for chunk in gen:
                if chunk and (chunk[-1].get("finished") or "error" in chunk[-1]):
                    done = True
                yield chunk
        except BackPressureError as exc:
            raise ApiError(f"the model replicas' queues are full; retry later ({exc})", kind="overloaded") from exc
        finally:
            if not done:
                # Closed early (client disconnected): cancel the replica's generator, which closes
                # the engine stream and aborts the request there (its KV blocks are freed).
                gen.cancel()

    async def info(self) -> dict[str, Any]:
        return await self._await(self.handle.info.remote())

    async def health(self) -> dict[str, Any]:
        return await asyncio.wait_for(self._await(self.handle.health.remote()), timeout=10.0)

    async def snapshots(self) -> list[dict[str, Any]]:
        """One snapshot from every live replica (Serve broadcast), not just one the router picks."""
        try:
            results = await self.handle.broadcast("snapshot").results_async(timeout_s=10.0, return_exceptions=True)
        except Exception:  # broadcast is an alpha API: fall back to whichever replica answers
            log.warning("broadcast failed; /metrics shows one replica", exc_info=True)
            results = [await self._await(self.handle.snapshot.remote())]
        return [r for r in results if isinstance(r, dict)]

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Every live replica runs the admin op (a broadcast: each holds its own adapter tiers).

        A replica that fails or times out is reported as an error entry, not dropped, so the caller
        sees which replicas did not apply the change. Loads may download from the Hub: long timeout.
        """
        timeout = 600.0 if op == "load" else 30.0
        results = await self.handle.broadcast("admin", op, payload).results_async(
            timeout_s=timeout, return_exceptions=True)
        return [r if isinstance(r, dict) else
                {"replica": f"#{i}", "error": {"kind": "error", "message": f"{type(r).__name__}: {r}"}}
                for i, r in enumerate(results)]


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """HTTP entry point. The Starlette app is built in the replica (late-bound `__serve_build_asgi_app__`)
    because its routes need this replica's DeploymentHandle; FastAPI's class-based views would add a
    second validation layer whose 422 bodies are not TGI's or OpenAI's error shapes."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int = 4 * 1024 * 1024,
                 affinity_routing: bool = False, admin: AdminConfig | None = None) -> None:
        self.backend = HandleBackend(model, tag_adapter=affinity_routing)
        self.max_body_bytes = max_body_bytes
        self.admin = admin or AdminConfig()  # validated again here: enabled without a token refuses to start

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_app(self.backend, max_body_bytes=self.max_body_bytes, ingress_id=_replica_id(),
                          admin=self.admin)
