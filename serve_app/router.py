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
   choices, the less loaded of two random replicas.

Each rank is a list of candidates; Serve tries them in order and among one rank picks the replica
with the shortest queue that still accepts the request, so a holder whose queue is full falls
through to the next rank instead of failing. The decision itself is the pure `rank_replicas`
(unit-tested without Ray, tests/test_affinity_routing.py); the class only gathers its inputs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

# Keys of the dict a ModelReplica returns from record_routing_stats.
STATS_ADAPTERS = "device_adapters"  # adapter ids resident in device slots
STATS_LOAD = "engine_load"  # running + waiting sequences in the engine

DEFAULT_IMBALANCE_THRESHOLD = 8.0


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
    choices: [[two random replicas], [the rest]] (one rank when there are at most two replicas).
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
    ids = [r.replica_id for r in replicas]
    if len(ids) <= 2:
        return [ids]
    pair = rng.sample(ids, 2)
    return [pair, [i for i in ids if i not in pair]]


def replica_view(replica_id: str, routing_stats: Mapping[str, Any] | None, queue_len: int | None) -> ReplicaView:
    """A replica's view from its advertised routing stats and the router's own queue-length cache.

    The queue-length cache counts requests this router sent and the replica has not finished; it is
    updated on every routing decision, so it is fresher than the stats (sent once a period). The
    engine's own load is the fallback for a replica the cache knows nothing about yet.
    """
    stats = routing_stats or {}
    adapters = frozenset(str(a) for a in stats.get(STATS_ADAPTERS, ()) or ())
    load = float(queue_len) if queue_len is not None else float(stats.get(STATS_LOAD, 0.0) or 0.0)
    return ReplicaView(replica_id, load, adapters)


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: adapter-resident replica first, unless it is much busier (see module doc).

    Configured in config.yaml / build_app through `request_router_config`:
    request_router_class "serve_app.router:AdapterAffinityRouter",
    request_router_kwargs {"imbalance_threshold": N}.
    """

    def initialize_state(self, imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD, **_: Any) -> None:
        self.imbalance_threshold = float(imbalance_threshold)

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
        ranks = rank_replicas(adapter_id, views, self.imbalance_threshold)
        return [[by_id[i] for i in rank] for rank in ranks]
