"""Refuse a flooding adapter at the ingress once its replica has refused it, instead of at the replica.

A request that a replica refuses (its adapter's waiting queue is at `max_waiting_per_adapter`, or
the adapter holds more than its share of a full queue) still costs a trip ingress -> replica ->
ingress, and the replica's share of that trip runs in the process whose GIL the engine's step
thread needs. Under a flood of many times capacity most of the flood's requests are such refusals,
so the flood slows the decode steps, and with them every other adapter's first token.

So the ingress remembers each adapter-scoped refusal (`refused`) and answers that adapter's next
requests itself, with the replica's own message and Retry-After, until one of:

- this ingress saw one of the adapter's requests end (`ended`): that freed a place in its queue,
  so one more request may go through (a credit per ended request);
- `hold_s` passed: places can also free up where this ingress cannot see (another ingress's
  requests, a waiting request moved into the running batch), so the gate reopens on its own and
  the replica decides again. `hold_s` is far below the time a full per-adapter queue takes to
  drain, so the adapter's queue never runs dry because of the gate: it only stops the refusals
  that would have happened anyway from reaching the replica.

A refusal that is not about the adapter (the whole waiting queue is past its hard limit) does not
close any gate: every adapter is refused there alike and the replica's answer stays the source.
Other adapters are never affected: each adapter has its own gate, and an adapter that was never
refused is never held. Bounded: at most `max_adapters` closed gates are kept (expired ones are
dropped first, then the oldest).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from serve_app.backends import Backend
from serve_app.engine_request import EngineRequest
from serve_app.errors import ErrorInfo

DEFAULT_HOLD_S = 0.25
MAX_HOLD_S = 60.0  # Retry-After's own upper bound (engine/adapter_queues.py RETRY_AFTER_RANGE_S)
MAX_CLOSED_GATES = 4096
BASE_KEY = ""  # the gate key of requests for the base model


@dataclass
class _Closed:
    reopen_at: float
    credits: int
    info: ErrorInfo


def check_hold_s(value: object) -> float:
    """`refusal_hold_s` as a float, or ValueError naming the setting and its range (settings and the
    gate both use this one check)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_HOLD_S:
        raise ValueError(f"refusal_hold_s must be a number of seconds in [0, {MAX_HOLD_S:g}], got {value!r}")
    return float(value)


class AdmissionGate:
    """Per-adapter memory of the replicas' refusals (see the module docstring). Not thread-safe: the
    ingress calls it from its one event loop."""

    def __init__(self, hold_s: float = DEFAULT_HOLD_S, max_adapters: int = MAX_CLOSED_GATES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.hold_s = check_hold_s(hold_s)
        self.max_adapters = max_adapters
        self._clock = clock
        self._closed: OrderedDict[str, _Closed] = OrderedDict()
        self.refused_here = 0  # requests this gate answered itself

    def check(self, adapter_id: str | None) -> ErrorInfo | None:
        """None: send the request on. Otherwise the refusal to answer with, here and now."""
        key = adapter_id or BASE_KEY
        closed = self._closed.get(key)
        if closed is None:
            return None
        now = self._clock()
        if now >= closed.reopen_at:
            del self._closed[key]
            return None
        if closed.credits > 0:
            closed.credits -= 1
            return None
        self.refused_here += 1
        info = ErrorInfo(**closed.info)  # type: ignore[typeddict-item]
        info["retry_after_s"] = max(float(closed.info.get("retry_after_s", 0.0)), closed.reopen_at - now)
        return info

    def refused(self, adapter_id: str | None, info: ErrorInfo) -> None:
        """A replica refused a request for `adapter_id` with `info`; closes its gate if the refusal was
        about the adapter."""
        if info.get("kind") != "overloaded" or info.get("scope") != "adapter" or self.hold_s == 0:
            return
        key = adapter_id or BASE_KEY
        now = self._clock()
        hold = min(self.hold_s, float(info.get("retry_after_s", self.hold_s)))
        self._closed.pop(key, None)
        self._closed[key] = _Closed(reopen_at=now + hold, credits=0, info=info)
        self._prune(now)

    def ended(self, adapter_id: str | None) -> None:
        """A request for `adapter_id` that a replica admitted has ended (any outcome)."""
        closed = self._closed.get(adapter_id or BASE_KEY)
        if closed is not None:
            closed.credits += 1

    def num_closed(self) -> int:
        now = self._clock()
        return sum(1 for c in self._closed.values() if c.reopen_at > now)

    def _prune(self, now: float) -> None:
        if len(self._closed) <= self.max_adapters:
            return
        for key in [k for k, c in self._closed.items() if c.reopen_at <= now]:
            del self._closed[key]
        while len(self._closed) > self.max_adapters:
            self._closed.popitem(last=False)


def _refusal(item: Any) -> ErrorInfo | None:
    error = item.get("error") if isinstance(item, dict) else None
    return error if isinstance(error, dict) and error.get("kind") == "overloaded" else None


class GatedBackend:
    """A Backend that consults an AdmissionGate before sending a request to `inner`, and tells it
    about refusals and ends. Everything else passes through."""

    def __init__(self, inner: Backend, gate: AdmissionGate) -> None:
        self.inner = inner
        self.gate = gate

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        adapter_id = req.get("adapter_id")
        held = self.gate.check(adapter_id)
        if held is not None:
            return {"error": held}
        result = await self.inner.generate(req)
        refusal = _refusal(result)
        if refusal is not None:
            self.gate.refused(adapter_id, refusal)
        else:
            self.gate.ended(adapter_id)
        return result

    async def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:
        adapter_id = req.get("adapter_id")
        held = self.gate.check(adapter_id)
        if held is not None:
            yield [{"error": held}]
            return
        refused = False
        chunks = self.inner.stream(req)
        try:
            async for chunk in chunks:
                for item in chunk:
                    refusal = _refusal(item)
                    if refusal is not None:
                        refused = True
                        self.gate.refused(adapter_id, refusal)
                yield chunk
        finally:
            # Closing this stream early must close the inner one now (it aborts the engine request),
            # not whenever it is garbage-collected.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if not refused:
                self.gate.ended(adapter_id)

    async def info(self) -> dict[str, Any]:
        return await self.inner.info()

    async def health(self) -> dict[str, Any]:
        return await self.inner.health()

    async def snapshots(self) -> list[dict[str, Any]]:
        return await self.inner.snapshots()

    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.inner.admin(op, payload)
