"""The ingress's admission gate (serve_app/admission_gate.py): after a replica refuses an adapter, the
ingress answers that adapter's next requests itself until a place frees up or `hold_s` passes; other
adapters, and refusals not about the adapter, are never held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.admission_gate import AdmissionGate, GatedBackend
from serve_app.errors import ErrorInfo


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal(scope: str = "adapter", retry_after_s: float = 3.0) -> ErrorInfo:
    info = ErrorInfo(message="qv already has 16 requests waiting (max_waiting_per_adapter=16); retry later",
                     kind="overloaded", field=None, retry_after_s=retry_after_s,
                     scope=scope)
    return info


def test_refused_adapter_is_held_until_hold_passes() -> None:
    clock = Clock()
    gate = AdmissionGate(hold_s=0.25, clock=clock)
    assert gate.check("qv") is None
    gate.refused("qv", refusal())
    held = gate.check("qv")
    assert held is not None and held["kind"] == "overloaded" and held["message"].startswith("qv already has")
    assert held["retry_after_s"] == 3.0  # the replica's own estimate, not shortened
    assert gate.check("other") is None and gate.check(None) is None  # nobody else is held
    clock.now += 0.2
    assert gate.check("qv") is not None
    clock.now += 0.06
    assert gate.check("qv") is None  # reopened: the replica decides again
    assert gate.check("qv") is None
    assert gate.refused_here == 2
    assert gate.num_closed() == 0


def test_hold_never_exceeds_the_replicas_retry_after() -> None:
    clock = Clock()
    gate = AdmissionGate(hold_s=0.25, clock=clock)
    gate.refused("qv", refusal(retry_after_s=0.05))
    assert gate.check("qv") is not None
    clock.now += 0.051
    assert gate.check("qv") is None


def test_each_ended_request_lets_one_more_through() -> None:
    clock = Clock()
    gate = AdmissionGate(hold_s=10.0, clock=clock)
    gate.refused("qv", refusal(retry_after_s=10.0))
    gate.ended("qv")
    gate.ended("qv")
    assert gate.check("qv") is None
    assert gate.check("qv") is None
    assert gate.check("qv") is not None  # credits used up
    gate.ended("other")  # another adapter's end frees nothing for qv here
    assert gate.check("qv") is not None


def test_refusals_not_about_the_adapter_hold_nothing() -> None:
    gate = AdmissionGate(hold_s=1.0, clock=Clock())
    gate.refused("qv", refusal(scope="queue"))
    gate.refused("qv", {k: v for k, v in refusal().items() if k != "scope"})  # type: ignore[arg-type]
    timeout = ErrorInfo(message="no first token", kind="queue_timeout", field=None)
    gate.refused("qv", timeout)
    assert gate.check("qv") is None
    assert AdmissionGate(hold_s=0.0).check("qv") is None  # hold 0: the gate is off
    off = AdmissionGate(hold_s=0.0)
    off.refused("qv", refusal())
    assert off.check("qv") is None


def test_closed_gates_are_bounded() -> None:
    clock = Clock()
    gate = AdmissionGate(hold_s=1.0, max_adapters=3, clock=clock)
    for i in range(5):
        gate.refused(f"a{i}", refusal())
    assert gate.num_closed() == 3
    assert [gate.check(f"a{i}") is None for i in range(5)] == [True, True, False, False, False]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hold_s"):
        AdmissionGate(hold_s=-1)
    with pytest.raises(ValueError, match="max_adapters"):
        AdmissionGate(max_adapters=0)


class FakeBackend:
    """Refuses adapter "flood" while `full`, answers everything else; records what reached it."""

    def __init__(self) -> None:
        self.full = True
        self.seen: list[str | None] = []
        self.closed_streams = 0

    def _refuses(self, adapter_id: str | None) -> bool:
        return adapter_id == "flood" and self.full

    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(req.get("adapter_id"))
        if self._refuses(req.get("adapter_id")):
            return {"error": refusal()}
        return {"generated_text": "ok"}

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        self.seen.append(req.get("adapter_id"))
        try:
            if self._refuses(req.get("adapter_id")):
                yield [{"error": refusal()}]
                return
            for i in range(3):
                yield [{"token": i}]
        finally:
            self.closed_streams += 1

    async def info(self) -> dict[str, Any]:
        return {"model_id": "m"}

    async def health(self) -> dict[str, Any]:
        return {"ok": True}

    async def snapshots(self) -> list[dict[str, Any]]:
        return [{"replica": "r"}]

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"op": op}]


def test_gated_backend_answers_the_flood_itself() -> None:
    clock = Clock()
    inner = FakeBackend()
    backend = GatedBackend(inner, AdmissionGate(hold_s=0.25, clock=clock))

    async def scenario() -> None:
        first = await backend.generate({"adapter_id": "flood"})
        assert first["error"]["kind"] == "overloaded"
        for _ in range(5):  # held here: none of these reaches the replica
            assert (await backend.generate({"adapter_id": "flood"}))["error"]["kind"] == "overloaded"
        assert [c async for c in backend.stream({"adapter_id": "flood"})] == [[{"error": backend.gate.check("flood")}]]
        assert inner.seen == ["flood"]
        assert await backend.generate({"adapter_id": "quiet"}) == {"generated_text": "ok"}
        assert [c async for c in backend.stream({"adapter_id": "quiet"})] == [[{"token": i}] for i in range(3)]
        clock.now += 0.3  # reopened; the replica has room again
        inner.full = False
        assert await backend.generate({"adapter_id": "flood"}) == {"generated_text": "ok"}
        assert inner.seen == ["flood", "quiet", "quiet", "flood"]
        # Passthrough of everything else.
        assert await backend.info() == {"model_id": "m"} and await backend.health() == {"ok": True}
        assert await backend.snapshots() == [{"replica": "r"}] and await backend.admin("list", {}) == [{"op": "list"}]

    asyncio.run(scenario())


def test_a_stream_closed_early_closes_the_inner_stream_and_frees_a_place() -> None:
    clock = Clock()
    inner = FakeBackend()
    gate = AdmissionGate(hold_s=10.0, clock=clock)
    backend = GatedBackend(inner, gate)

    async def scenario() -> None:
        inner.full = False
        stream = backend.stream({"adapter_id": "flood"})
        assert await stream.__anext__() == [{"token": 0}]
        gate.refused("flood", refusal(retry_after_s=10.0))  # meanwhile another request was refused
        await stream.aclose()  # the client went away
        assert inner.closed_streams == 1
        assert gate.check("flood") is None  # its end freed one place
        assert gate.check("flood") is not None

    asyncio.run(scenario())
