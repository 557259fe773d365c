"""Autoscaling on the aggregated load of all adapters combined.

Each ModelReplica reports its engine's load through Ray Serve's custom autoscaling metrics
(`record_autoscaling_stats`: running + waiting sequences over every adapter, KV-cache usage, the
oldest waiting request's age). `AggregateLoadPolicy` sums the load over replicas and asks for
ceil(total / target_load_per_replica) replicas. A replica set only shrinks when the load would fit
comfortably in fewer replicas (hysteresis), so load that hovers around a threshold does not make
it flap. Ray Serve wraps a custom policy with the deployment's min/max replicas and
upscale/downscale delays (`autoscaling_config` in config.yaml); the policy's own knobs come in
through `policy_kwargs`.

The policy is a pure function of the context (and its own small state), so it is unit-tested on
synthetic contexts without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from serve_app.stats_keys import ENGINE_LOAD, KV_USAGE, QUEUE_WAIT_S


class ContextLike(Protocol):
    """The fields of ray.serve.config.AutoscalingContext the policy reads."""

    current_num_replicas: int
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]

    @property
    def aggregated_metrics(self) -> Mapping[str, Mapping[Any, float]] | None: ...

    @property
    def total_num_requests(self) -> float: ...


def engine_load_stats(stats: Mapping[str, Any], now_waiting_age_s: float = 0.0) -> dict[str, float]:
    """What a replica reports from `Engine.stats()` (the dict record_autoscaling_stats returns)."""
    total = max(1, int(stats.get("kv_blocks_total", 1)))
    return {
        ENGINE_LOAD: float(stats.get("num_running", 0)) + float(stats.get("num_waiting", 0)),
        KV_USAGE: float(stats.get("kv_blocks_used", 0)) / total,
        QUEUE_WAIT_S: float(now_waiting_age_s),
    }


class AggregateLoadPolicy:
    """Replica count from the sum of engine load over all replicas (all adapters together).

    target_load_per_replica: sequences one replica should hold (running + waiting).
    downscale_headroom: shrink only when total load < headroom x target x (replicas - 1).
    kv_pressure: with mean KV usage above it, never ask for fewer replicas than now.
    max_queue_wait_s: a request waiting longer than this anywhere asks for one more replica.
    """

    def __init__(
        self,
        target_load_per_replica: float = 16.0,
        downscale_headroom: float = 0.7,
        kv_pressure: float = 0.9,
        max_queue_wait_s: float = 5.0,
    ) -> None:
        if target_load_per_replica <= 0:
            raise ValueError(f"target_load_per_replica must be > 0, got {target_load_per_replica}")
        if not 0 < downscale_headroom <= 1:
            raise ValueError(f"downscale_headroom must be in (0, 1], got {downscale_headroom}")
        self.target = float(target_load_per_replica)
        self.headroom = float(downscale_headroom)
        self.kv_pressure = float(kv_pressure)
        self.max_queue_wait_s = float(max_queue_wait_s)

    def __call__(self, ctx: ContextLike) -> tuple[int, dict[str, Any]]:
        current = max(0, int(ctx.current_num_replicas))
        lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        metrics = ctx.aggregated_metrics or {}
        per_replica = dict(metrics.get(ENGINE_LOAD, {}))
        if per_replica:
            total = sum(per_replica.values())
        else:  # no custom metrics yet (replicas starting): Serve's own ongoing-request count
            total = float(ctx.total_num_requests or 0.0)
        desired = math.ceil(total / self.target) if total > 0 else 0
        if current > 0 and desired < current:
            # Hysteresis: drop a replica only when the load fits well within one fewer.
            fits_in = math.ceil(total / (self.target * self.headroom)) if total > 0 else 0
            desired = max(desired, min(current, fits_in))
            kv = list(metrics.get(KV_USAGE, {}).values())
            if kv and sum(kv) / len(kv) > self.kv_pressure:
                desired = current
        waits = list(metrics.get(QUEUE_WAIT_S, {}).values())
        if waits and max(waits) > self.max_queue_wait_s:
            desired = max(desired, current + 1)
        desired = max(lo, min(hi, desired))
        state = dict(ctx.policy_state or {})
        state["last_total_load"] = total
        state["last_desired"] = desired
        return desired, state
