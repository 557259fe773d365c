"""Adapter-affinity request routing for the ModelReplica deployment.

A request for adapter A should go to a replica where A is already in a device slot: a replica
without it must first load A from host memory (or disk) into a slot, possibly evicting another
adapter that its own requests then have to load again. So each replica advertises, through Ray
Serve's `record_routing_stats` (every `request_routing_stats_period_s`), the adapters resident in
its device slots and its engine load; the ingress tags each request with its adapter id as the
handle's `multiplexed_model_id` (Serve carries it in the request metadata the router sees), and
`AdapterAffinityRouter` ranks the replicas:

1. the least-loaded replica holding the adapter, unless it is busier than the least-loaded replica
   overall by more than `imbalance_threshold` requests (affinity must not pile a hot adapter onto
   one replica while another idles: then load wins, and the idle replica loads the adapter);
2. otherwise (no adapter, an adapter no replica holds, or too much imbalance): power of two
   choices, the less loaded of two random replicas first and the other next (see `rank_replicas`).

Advertised residency lags: a replica reports its adapters once a period and the controller then
broadcasts them, so for a second or two after a replica first gets an adapter no router knows it
holds it. Requests for that adapter in the gap would be spread by power of two choices, each
replica would load it, and with two holders affinity is lost for good (both hold it, least loaded
wins). So each router also remembers where it sent each adapter recently (`RecentRoutes`) and
counts those replicas as holders. And a holder that is slow to answer the queue-length probe
(its engine thread keeps the replica busy) must not lose the request to the next rank for that
alone: the router waits `probe_deadline_s` (Serve's default is 0.1 s) before falling through.

Each rank is a list of candidates; Serve tries them in order and among one rank picks the replica
with the shortest queue that still accepts the request, so a holder whose queue is full falls
through to the next rank instead of failing. The decision itself is the pure `rank_replicas`
(unit-tested without Ray, tests/test_affinity_routing.py); the class only gathers its inputs.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

from serve_app.stats_keys import DEVICE_ADAPTERS, ENGINE_LOAD

DEFAULT_IMBALANCE_THRESHOLD = 8.0
DEFAULT_RECENT_ROUTE_TTL_S = 5.0
DEFAULT_PROBE_DEADLINE_S = 0.5
MAX_REMEMBERED_ADAPTERS = 4096


@dataclass(frozen=True)
class ReplicaView:
    """What the routing decision needs to know about one replica."""

    replica_id: str
    load: float
    adapters: frozenset[str] = frozenset()


def rank_replicas(
    adapter_id: str | None,
    replicas: Sequence[ReplicaView],
    imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
    rng: random.Random | None = None,
) -> list[list[str]]:
    """Replica ids in ranks to try in order (Serve picks the least-loaded accepting one per rank).

    Affinity: [[best holder], [everyone else]] when the least-loaded holder of `adapter_id` is at
    most `imbalance_threshold` busier than the least-loaded replica. Otherwise power of two
    choices, decided here: [[the less loaded of two random replicas], [the other], [the rest]]
    (ties broken at random). Not one rank with both: within a rank Serve takes a replica whose
    queue length it has cached over one it would have to probe, so a burst of requests for new
    adapters all went to the one replica it had heard from last, and stayed there by affinity.
    """
    if not replicas:
        return []
    rng = rng or random
    least = min(r.load for r in replicas)
    if adapter_id:
        holders = [r for r in replicas if adapter_id in r.adapters]
        if holders:
            best = min(holders, key=lambda r: r.load)
            if best.load - least <= imbalance_threshold:
                rest = [r.replica_id for r in sorted(replicas, key=lambda r: r.load) if r is not best]
                return [[best.replica_id], rest] if rest else [[best.replica_id]]
    if len(replicas) == 1:
        return [[replicas[0].replica_id]]
    pair = sorted(rng.sample(list(replicas), 2), key=lambda r: (r.load, rng.random()))
    ranks = [[pair[0].replica_id], [pair[1].replica_id]]
    rest = [r.replica_id for r in replicas if r is not pair[0] and r is not pair[1]]
    return [*ranks, rest] if rest else ranks


def replica_view(replica_id: str, routing_stats: Mapping[str, Any] | None, queue_len: int | None) -> ReplicaView:
    """A replica's view from its advertised routing stats and the router's own queue-length cache.

    The queue-length cache counts requests this router sent and the replica has not finished; it is
    updated on every routing decision, so it is fresher than the stats (sent once a period). The
    engine's own load is the fallback for a replica the cache knows nothing about yet.
    """
    stats = routing_stats or {}
    adapters = frozenset(str(a) for a in stats.get(DEVICE_ADAPTERS, ()) or ())
    load = float(queue_len) if queue_len is not None else float(stats.get(ENGINE_LOAD, 0.0) or 0.0)
    return ReplicaView(replica_id, load, adapters)


class RecentRoutes:
    """Which replicas this router sent each adapter to in the last `ttl_s` seconds.

    Bounded: at most `max_adapters` adapters are remembered (least recently routed forgotten
    first), and entries older than `ttl_s` are ignored and dropped. After `ttl_s` the replicas'
    own advertisements, which also reflect evictions, are the only source again.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_RECENT_ROUTE_TTL_S,
        max_adapters: int = MAX_REMEMBERED_ADAPTERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or max_adapters < 1:
            raise ValueError(f"ttl_s must be >= 0 and max_adapters >= 1, got {ttl_s}, {max_adapters}")
        self.ttl_s = ttl_s
        self.max_adapters = max_adapters
        self._clock = clock
        self._routes: OrderedDict[str, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def record(self, adapter_id: str, replica_id: str) -> None:
        routes = self._routes.pop(adapter_id, {})
        routes[replica_id] = self._clock()
        self._routes[adapter_id] = routes
        while len(self._routes) > self.max_adapters:
            self._routes.popitem(last=False)

    def replicas_for(self, adapter_id: str) -> frozenset[str]:
        routes = self._routes.get(adapter_id)
        if not routes:
            return frozenset()
        oldest = self._clock() - self.ttl_s
        fresh = {rid: t for rid, t in routes.items() if t >= oldest}
        if fresh:
            self._routes[adapter_id] = fresh
        else:
            del self._routes[adapter_id]
        return frozenset(fresh)

    def forget_replica(self, replica_id: str) -> None:
        for adapter_id in list(self._routes):
            routes = self._routes[adapter_id]
            routes.pop(replica_id, None)
            if not routes:
                del self._routes[adapter_id]


def with_recent_routes(views: Sequence[ReplicaView], adapter_id: str | None, recent: frozenset[str]) -> list[ReplicaView]:
    """`views` with `adapter_id` added to the adapters of the replicas it was recently routed to."""
    if not adapter_id or not recent:
        return list(views)
    return [
        ReplicaView(v.replica_id, v.load, v.adapters | {adapter_id}) if v.replica_id in recent else v for v in views
    ]


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: adapter-resident replica first, unless it is much busier (see module doc).

    Configured in config.yaml / build_app through `request_router_config`:
    request_router_class "serve_app.router:AdapterAffinityRouter",
    request_router_kwargs {"imbalance_threshold": N, "recent_route_ttl_s": S, "probe_deadline_s": D}.
    """

    def initialize_state(
        self,
        imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
        recent_route_ttl_s: float = DEFAULT_RECENT_ROUTE_TTL_S,
        probe_deadline_s: float = DEFAULT_PROBE_DEADLINE_S,
        **_: Any,
    ) -> None:
        self.imbalance_threshold = float(imbalance_threshold)
        self.recent_routes = RecentRoutes(float(recent_route_ttl_s))
        # Serve's probe deadline (doubling per retry up to its max); raised so a busy holder answers.
        self.queue_len_response_deadline_s = float(probe_deadline_s)
        self.max_queue_len_response_deadline_s = max(self.max_queue_len_response_deadline_s, 4 * probe_deadline_s)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter_id = None
        if pending_request is not None:
            adapter_id = pending_request.metadata.multiplexed_model_id or None
        by_id: dict[str, RunningReplica] = {}
        views: list[ReplicaView] = []
        for r in candidate_replicas:
            key = r.replica_id.unique_id
            by_id[key] = r
            views.append(replica_view(key, r.routing_stats, self._replica_queue_len_cache.get(r.replica_id)))
        if adapter_id:
            views = with_recent_routes(views, adapter_id, self.recent_routes.replicas_for(adapter_id))
        ranks = rank_replicas(adapter_id, views, self.imbalance_threshold)
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        adapter_id = pending_request.metadata.multiplexed_model_id
        if adapter_id:
            self.recent_routes.record(adapter_id, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.recent_routes.forget_replica(replica_id.unique_id)
