"""Where the HTTP layer sends engine requests: a Protocol, and the in-process implementation.

The Ray implementation (`HandleBackend`, a DeploymentHandle to the ModelReplica deployment) lives in
serve_app/deployments.py; `LocalBackend` calls a ReplicaCore in the same process, which the tests
and `loadtests/bench_serve.py` use to run the exact same HTTP app without Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve_app.core import ReplicaCore
from serve_app.engine_request import EngineRequest


class Backend(Protocol):
    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        """The final result dict, or {"error": ErrorInfo}."""
        ...

    def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        """Chunks of deltas. Closing the iterator early must abort the request in the engine."""
        ...

    async def info(self) -> dict[str, Any]: ...

    async def health(self) -> dict[str, Any]: ...

    async def snapshots(self) -> list[dict[str, Any]]:
        """One metrics/stats snapshot per model replica."""
        ...

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """An adapter admin operation on every model replica (serve_app/admin.py): one result each."""
        ...


class LocalBackend:
    def __init__(self, core: ReplicaCore) -> None:
        self.core = core

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        return await self.core.generate(req)

    def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        return self.core.stream(req)

    async def info(self) -> dict[str, Any]:
        return self.core.info()

    async def health(self) -> dict[str, Any]:
        return self.core.health()

    async def snapshots(self) -> list[dict[str, Any]]:
        return [self.core.snapshot()]

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [await self.core.admin(op, payload)]
