"""Adapter-affinity routing: the pure ranking function of serve_app/router.py, without Ray running.

The end-to-end check (2 replicas, >= 90% of a resident adapter's requests on its holder, measured
from the replicas' own counters) is in tests/test_autoscaling_e2e.py, which shares one Serve
instance with the autoscaling tests.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from serve_app.router import (
    RecentRoutes,
    ReplicaView,
    rank_replicas,
    replica_view,
    with_recent_routes,
)
from serve_app.stats_keys import DEVICE_ADAPTERS, ENGINE_LOAD


def views(*specs: tuple[str, float, set[str]]) -> list[ReplicaView]:
    return [ReplicaView(rid, load, frozenset(adapters)) for rid, load, adapters in specs]


def test_holder_wins_when_load_is_close() -> None:
    replicas = views(("a", 3, {"x"}), ("b", 0, {"y"}), ("c", 5, set()))
    assert rank_replicas("x", replicas, imbalance_threshold=4) == [["a"], ["b", "c"]]
    assert rank_replicas("y", replicas, imbalance_threshold=4) == [["b"], ["a", "c"]]


def test_least_loaded_holder_among_several() -> None:
    replicas = views(("a", 6, {"x"}), ("b", 2, {"x"}), ("c", 1, set()))
    assert rank_replicas("x", replicas, imbalance_threshold=4)[0] == ["b"]


def test_imbalance_beats_affinity() -> None:
    # The holder has 10 more requests than an idle replica: load wins (power of two over all).
    replicas = views(("a", 10, {"x"}), ("b", 0, set()))
    ranks = rank_replicas("x", replicas, imbalance_threshold=8)
    assert ranks == [["b"], ["a"]]  # the idle one first, the holder as the fallback
    # Exactly at the threshold affinity still holds.
    assert rank_replicas("x", views(("a", 8, {"x"}), ("b", 0, set())), imbalance_threshold=8)[0] == ["a"]


@pytest.mark.parametrize("adapter", [None, "", "unknown"])
def test_no_adapter_or_unknown_is_power_of_two(adapter: str | None) -> None:
    replicas = views(("a", 0, {"x"}), ("b", 0, set()), ("c", 0, set()), ("d", 0, set()))
    rng = random.Random(0)
    firsts: Counter[str] = Counter()
    for _ in range(400):
        ranks = rank_replicas(adapter, replicas, rng=rng)
        assert [len(r) for r in ranks] == [1, 1, 2]  # one of the pair, the other, the rest
        assert sorted(r for rank in ranks for r in rank) == ["a", "b", "c", "d"]
        firsts.update(ranks[0])
    assert all(firsts[r] > 60 for r in "abcd"), firsts  # equal loads: each first ~100 times


def test_power_of_two_puts_the_less_loaded_first() -> None:
    """The router itself orders the pair (Serve, given one rank with both, prefers whichever replica
    it has a cached queue length for): with two replicas the less loaded is tried first, and a
    burst of requests for new adapters alternates as the loads it counts grow."""
    assert rank_replicas("new", views(("a", 3, {"x"}), ("b", 1, set()))) == [["b"], ["a"]]
    assert rank_replicas(None, views(("a", 0, set()), ("b", 2, set()))) == [["a"], ["b"]]
    loads = {"a": 0.0, "b": 0.0}
    rng = random.Random(1)
    for i in range(8):  # eight new adapters at once, as the router sees them: its counts grow per request
        first = rank_replicas(f"adapter-{i}", views(*((r, n, set()) for r, n in loads.items())), rng=rng)[0][0]
        loads[first] += 1
    assert loads == {"a": 4.0, "b": 4.0}
    # Among more replicas the pair is random and its less loaded member goes first.
    replicas = views(("a", 5, set()), ("b", 0, set()), ("c", 9, set()))
    for _ in range(50):
        ranks = rank_replicas(None, replicas, rng=rng)
        load = {v.replica_id: v.load for v in replicas}
        assert load[ranks[0][0]] <= load[ranks[1][0]]


def test_edge_cases() -> None:
    assert rank_replicas("x", []) == []
    assert rank_replicas("x", views(("a", 100, {"x"}))) == [["a"]]
    assert rank_replicas(None, views(("a", 1, set()))) == [["a"]]


def test_replica_view_prefers_fresh_queue_length() -> None:
    stats = {DEVICE_ADAPTERS: ["x", "y"], ENGINE_LOAD: 7.0}
    assert replica_view("r", stats, 2) == ReplicaView("r", 2.0, frozenset({"x", "y"}))
    assert replica_view("r", stats, None).load == 7.0  # no queue-length info yet: the engine's load
    assert replica_view("r", None, None) == ReplicaView("r", 0.0, frozenset())  # no stats reported yet


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recent_routes_expire_after_ttl() -> None:
    clock = FakeClock()
    recent = RecentRoutes(ttl_s=5, clock=clock)
    recent.record("x", "a")
    clock.now += 3
    recent.record("x", "b")
    assert recent.replicas_for("x") == {"a", "b"}
    assert recent.replicas_for("y") == frozenset()
    clock.now += 2.5  # a is 5.5 s old, b 2.5 s
    assert recent.replicas_for("x") == {"b"}
    clock.now += 3
    assert recent.replicas_for("x") == frozenset() and len(recent) == 0  # expired entries are dropped


def test_recent_routes_are_bounded_and_forget_dead_replicas() -> None:
    clock = FakeClock()
    recent = RecentRoutes(ttl_s=60, max_adapters=3, clock=clock)
    for i in range(5):
        recent.record(f"ad{i}", "a")
    recent.record("ad2", "b")  # routed again: now the most recent, so ad3 goes next
    assert len(recent) == 3
    assert recent.replicas_for("ad0") == frozenset() and recent.replicas_for("ad1") == frozenset()
    recent.record("ad5", "a")
    assert recent.replicas_for("ad3") == frozenset()
    assert recent.replicas_for("ad2") == {"a", "b"}
    recent.forget_replica("a")
    assert recent.replicas_for("ad2") == {"b"} and recent.replicas_for("ad4") == frozenset()
    with pytest.raises(ValueError):
        RecentRoutes(ttl_s=-1)


def test_recently_routed_replica_counts_as_holder_before_it_advertises() -> None:
    # Neither replica has advertised x yet, but this router sent x to b a moment ago: b is the holder.
    replicas = views(("a", 0, set()), ("b", 1, {"y"}))
    merged = with_recent_routes(replicas, "x", frozenset({"b"}))
    assert merged[1].adapters == {"x", "y"} and merged[0] == replicas[0]
    assert rank_replicas("x", merged, imbalance_threshold=8) == [["b"], ["a"]]
    assert with_recent_routes(replicas, None, frozenset({"b"})) == replicas


def test_config_yaml_wires_router_and_policy() -> None:
    """config.yaml's args give ModelReplica the affinity router and the aggregate-load policy, in
    shapes Ray Serve's own config models accept; top-level policy knobs are shorthand for kwargs."""
    from pathlib import Path

    import yaml
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from serve_app.app import AFFINITY_ROUTER, AGGREGATE_POLICY, autoscaling_config, deployment_options
    from serve_app.settings import AppSettings

    args = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["applications"][0]["args"]
    settings = AppSettings.from_args(args, env={})
    model, _ = deployment_options(settings, 64, 1024)
    assert model["num_replicas"] == "auto" and model["ray_actor_options"]["num_cpus"] == 0.5
    auto = AutoscalingConfig(**model["autoscaling_config"])
    assert (auto.min_replicas, auto.max_replicas) == (1, 2)
    assert auto.policy.policy_function == AGGREGATE_POLICY
    assert auto.policy.policy_kwargs["target_load_per_replica"] == 8
    router = RequestRouterConfig(**model["request_router_config"])
    assert router.request_router_class == AFFINITY_ROUTER
    assert router.request_router_kwargs == {"imbalance_threshold": 8, "recent_route_ttl_s": 5.0}

    short = autoscaling_config({"min_replicas": 1, "max_replicas": 3, "target_load_per_replica": 4})
    assert short["policy"] == {"policy_function": AGGREGATE_POLICY, "policy_kwargs": {"target_load_per_replica": 4}}
    with pytest.raises(ValueError, match="configure"):
        autoscaling_config({"policy": {"policy_function": "x:y"}, "target_load_per_replica": 4})
    off = AppSettings.from_args({"affinity_routing": False}, env={})
    assert "request_router_config" not in deployment_options(off, 8, 32)[0]
