"""The aggregate-load autoscaling policy on synthetic contexts (no Ray needed)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from serve_app.autoscaling import AggregateLoadPolicy, engine_load_stats
from serve_app.stats_keys import ENGINE_LOAD, KV_USAGE, QUEUE_WAIT_S


@dataclass
class Ctx:
    current_num_replicas: int
    loads: list[float]
    capacity_adjusted_min_replicas: int = 1
    capacity_adjusted_max_replicas: int = 4
    kv: list[float] | None = None
    waits: list[float] | None = None
    total_num_requests: float = 0.0
    policy_state: dict[str, Any] = field(default_factory=dict)

    @property
    def aggregated_metrics(self) -> dict[str, dict[str, float]]:
        m = {ENGINE_LOAD: {f"r{i}": v for i, v in enumerate(self.loads)}}
        if self.kv is not None:
            m[KV_USAGE] = {f"r{i}": v for i, v in enumerate(self.kv)}
        if self.waits is not None:
            m[QUEUE_WAIT_S] = {f"r{i}": v for i, v in enumerate(self.waits)}
        return m


policy = AggregateLoadPolicy(target_load_per_replica=10, downscale_headroom=0.7)


def test_burst_scales_up_on_the_sum_over_adapters_and_replicas() -> None:
    # one replica holding 35 sequences spread over many adapters: the sum decides, not any one adapter
    assert policy(Ctx(1, [35.0]))[0] == 4
    assert policy(Ctx(2, [12.0, 11.0]))[0] == 3


def test_idle_goes_down_to_min() -> None:
    assert policy(Ctx(3, [0.0, 0.0, 0.0]))[0] == 1
    assert policy(Ctx(3, [0.0, 0.0, 0.0], capacity_adjusted_min_replicas=2))[0] == 2


def test_max_replicas_caps_a_burst() -> None:
    assert policy(Ctx(2, [500.0, 500.0]))[0] == 4


def test_noisy_load_near_a_threshold_does_not_flap() -> None:
    rng = random.Random(0)
    decisions = set()
    replicas = 2
    for _ in range(200):
        total = 15 + rng.uniform(-4, 4)  # between 11 and 19 sequences, around the 2-replica threshold
        replicas, _ = policy(Ctx(replicas, [total / replicas] * replicas))
        decisions.add(replicas)
    assert decisions == {2}


def test_scale_down_needs_headroom() -> None:
    assert policy(Ctx(2, [4.5, 4.5]))[0] == 2  # 9 would fit in 1 replica only at 90%: keep 2
    assert policy(Ctx(2, [3.0, 3.0]))[0] == 1  # 6 fits in one at 60%


def test_kv_pressure_and_queue_wait() -> None:
    assert policy(Ctx(2, [2.0, 2.0], kv=[0.95, 0.97]))[0] == 2  # KV nearly full: don't shrink
    assert policy(Ctx(1, [5.0], waits=[12.0]))[0] == 2  # requests wait too long: one more


def test_falls_back_to_serve_request_count_before_custom_metrics() -> None:
    ctx = Ctx(1, [], total_num_requests=25.0)
    assert policy(ctx)[0] == 3


def test_engine_stats_to_metrics() -> None:
    m = engine_load_stats({"num_running": 5, "num_waiting": 7, "kv_blocks_used": 25, "kv_blocks_total": 100}, 1.5)
    assert m == {ENGINE_LOAD: 12.0, KV_USAGE: 0.25, QUEUE_WAIT_S: 1.5}


def test_bad_kwargs() -> None:
    with pytest.raises(ValueError, match="target_load_per_replica"):
        AggregateLoadPolicy(target_load_per_replica=0)
