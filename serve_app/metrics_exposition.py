"""Metrics exposition: replica snapshots (serve_app/metrics.py's `ReplicaMetrics.snapshot()` and the
engine's stats) rendered as Prometheus text by the ingress, one `replica` label per replica.

The families are built fresh on each scrape by a `prometheus_client` collector (no registry state
between scrapes: the replicas hold the counts); per-adapter counters are folded past
ADAPTER_LABELS_NAMED adapters so the number of series stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from serve_app.metrics import ADAPTER_LABELS_NAMED, BATCH_BUCKETS, OTHER_ADAPTERS_LABEL, Histogram
from serve_app.stats_keys import SNAPSHOT_ENGINE, SNAPSHOT_METRICS, SNAPSHOT_REPLICA

BASE_LABEL = "__base__"  # the `adapter` label value of requests for the base model


def _label(adapter: str) -> str:
    return adapter or BASE_LABEL


def _histogram_buckets(hist: Mapping[str, Any]) -> list[tuple[str, float]]:
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, n in zip([*hist["buckets"], math.inf], hist["counts"]):
        cumulative += n
        out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(cumulative)))
    return out


def fold_adapters(per_adapter: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """`keys` of each adapter's entry, the first ADAPTER_LABELS_NAMED adapters by name and the rest summed
    under OTHER_ADAPTERS_LABEL (for counters: see ADAPTER_LABELS_NAMED)."""
    out: dict[str, dict[str, float]] = {}
    for i, (adapter, entry) in enumerate(per_adapter.items()):
        label = _label(adapter) if i < ADAPTER_LABELS_NAMED else OTHER_ADAPTERS_LABEL
        folded = out.setdefault(label, dict.fromkeys(keys, 0.0))
        for key in keys:
            folded[key] += float(entry.get(key, 0) or 0)
    return out


# EngineStats.fairness (snapshot["engine"]["fairness"]) counters per adapter, and the `reason` label of each refusal counter.
FAIRNESS_COUNTERS = ("admitted", "prefill_tokens", "decode_tokens", "rejected", "queue_timeouts", "request_timeouts",
                     "queue_wait_s_sum")
REJECTION_REASONS = (("rejected", "overloaded"), ("queue_timeouts", "queue_timeout"), ("request_timeouts", "request_timeout"))


def batch_size_histogram(batch_seqs_hist: Mapping[Any, int]) -> dict[str, Any]:
    """The engine's exact {batch size: steps} map as a Prometheus histogram over BATCH_BUCKETS."""
    hist = Histogram(BATCH_BUCKETS)
    for size, steps in batch_seqs_hist.items():
        hist.observe(float(size), int(steps))
    return hist.to_dict()


class SnapshotCollector(Collector):
    """Turns replica snapshots (+ the ingress's own HTTP counters) into Prometheus metric families."""

    def __init__(self, snapshots: Sequence[Mapping[str, Any]], http_counts: Mapping[tuple[str, str], int],
                 ingress_id: str) -> None:
        self.snapshots = snapshots
        self.http_counts = http_counts
        self.ingress_id = ingress_id

    def collect(self) -> Iterable[Metric]:
        p = "loraserve_"
        requests = CounterMetricFamily(
            p + "requests", "Requests that reached a model replica, by adapter and final status",
            labels=["replica", "adapter", "status"],
        )
        gen_tokens = CounterMetricFamily(p + "generated_tokens", "Generated tokens by adapter", labels=["replica", "adapter"])
        prompt_tokens = CounterMetricFamily(p + "prompt_tokens", "Prompt tokens by adapter", labels=["replica", "adapter"])
        ttft = HistogramMetricFamily(p + "time_to_first_token_seconds", "Time to first token", labels=["replica"])
        tpot = HistogramMetricFamily(p + "time_per_output_token_seconds", "Mean time per output token after the first", labels=["replica"])
        latency = HistogramMetricFamily(p + "request_duration_seconds", "End-to-end request duration", labels=["replica"])
        batch = HistogramMetricFamily(p + "batch_size", "Sequences per engine step (mixed-adapter batches)", labels=["replica"])
        queue = GaugeMetricFamily(p + "queue_length", "Requests waiting in the engine, by adapter", labels=["replica", "adapter"])
        running_by_adapter = GaugeMetricFamily(p + "running_requests", "Requests in the running batch, by adapter", labels=["replica", "adapter"])
        running = GaugeMetricFamily(p + "running_batch_size", "Sequences in the running batch now", labels=["replica"])
        last_batch = GaugeMetricFamily(p + "last_step_batch_size", "Sequences in the last engine step", labels=["replica"])
        max_batch = GaugeMetricFamily(p + "max_batch_size", "Largest engine step so far (sequences)", labels=["replica"])
        kv_used = GaugeMetricFamily(p + "kv_blocks_used", "KV-cache blocks in use", labels=["replica"])
        kv_free = GaugeMetricFamily(p + "kv_blocks_free", "KV-cache blocks free", labels=["replica"])
        kv_total = GaugeMetricFamily(p + "kv_blocks_total", "KV-cache blocks", labels=["replica"])
        # Prefix cache (engine/block_manager.py), as vLLM's counters: hit rate = rate(hits) / rate(queries).
        pc_queries = CounterMetricFamily(p + "prefix_cache_queries", "Prompt tokens of admitted requests looked up "
                                         "in the prefix cache", labels=["replica"])
        pc_hits = CounterMetricFamily(p + "prefix_cache_hits", "Of those, tokens whose K/V came from the cache",
                                      labels=["replica"])
        pc_blocks = GaugeMetricFamily(p + "prefix_cache_blocks", "KV blocks holding cached K/V (in use: held by a "
                                      "running request; evictable: free, reusable until needed)",
                                      labels=["replica", "state"])
        slots = GaugeMetricFamily(p + "adapter_slots", "Device adapter slots", labels=["replica"])
        slots_pinned = GaugeMetricFamily(p + "adapter_slots_pinned", "Device adapter slots pinned by running requests", labels=["replica"])
        steps = CounterMetricFamily(p + "engine_steps", "Engine steps (batches run)", labels=["replica"])
        preemptions = CounterMetricFamily(p + "preemptions", "Sequences preempted for lack of KV blocks", labels=["replica"])
        chunks = CounterMetricFamily(p + "stream_chunks", "Messages sent to the ingress on streaming requests", labels=["replica"])
        deltas = CounterMetricFamily(p + "stream_deltas", "Token deltas in those messages", labels=["replica"])
        replicas = GaugeMetricFamily(p + "model_replicas", "Model replicas that answered this scrape")
        # Adapter tiers (engine/adapter_pool.py): source (disk/Hub) -> host cache -> device slots.
        # A device miss that finds the adapter in host memory is a host hit and one host->device load.
        a_hits = CounterMetricFamily(p + "adapter_cache_hits", "Adapter lookups served by a tier (device: already "
                                     "in a slot; host: copied from the host cache)", labels=["replica", "tier"])
        a_misses = CounterMetricFamily(p + "adapter_cache_misses", "Adapter lookups a tier could not serve",
                                       labels=["replica", "tier"])
        a_loads = CounterMetricFamily(p + "adapter_loads", "Adapter loads into a tier (host: read from the source; "
                                      "device: copied into a slot)", labels=["replica", "tier"])
        a_load_failures = CounterMetricFamily(p + "adapter_load_failures", "Adapter reads that failed",
                                              labels=["replica"])
        a_evictions = CounterMetricFamily(p + "adapter_evictions", "Adapters evicted from a tier (LRU)",
                                          labels=["replica", "tier"])
        a_load_seconds = HistogramMetricFamily(p + "adapter_load_seconds", "Time to read an adapter from its source "
                                               "into the host cache", labels=["replica"])
        a_bytes = GaugeMetricFamily(p + "adapter_bytes", "Bytes of adapter weights resident in a tier",
                                    labels=["replica", "tier"])
        a_capacity = GaugeMetricFamily(p + "adapter_capacity_bytes", "Bytes a tier may hold (host: the LRU budget; "
                                       "device: the slots' allocation)", labels=["replica", "tier"])
        a_count = GaugeMetricFamily(p + "adapters", "Adapters by state (registered, host, device, loading)",
                                    labels=["replica", "state"])
        nonfinite = CounterMetricFamily(p + "nonfinite_outputs", "Requests stopped because the model produced NaN/Inf "
                                        "logits, by adapter", labels=["replica", "adapter"])
        http = CounterMetricFamily(p + "http_requests", "HTTP responses of the ingress replica that answered this scrape",
                                   labels=["ingress", "route", "code"])
        # Fair sharing under overload (engine/fair_share.py): per adapter, from EngineStats.fairness.
        a_ttft = HistogramMetricFamily(p + "adapter_time_to_first_token_seconds", "Time to first token, by adapter",
                                       labels=["replica", "adapter"])
        a_queue_wait = SummaryMetricFamily(p + "adapter_queue_wait_seconds", "Time from arrival to first admission "
                                           "into a batch, by adapter (count: requests admitted)",
                                           labels=["replica", "adapter"])
        a_queue_wait_max = GaugeMetricFamily(p + "adapter_queue_wait_max_seconds", "Longest wait from arrival to "
                                             "first admission so far, by adapter", labels=["replica", "adapter"])
        a_rejections = CounterMetricFamily(p + "adapter_rejections", "Requests refused at arrival (overloaded: 429) "
                                           "or stopped at a deadline (queue_timeout: 503, request_timeout: 504), "
                                           "by adapter", labels=["replica", "adapter", "reason"])
        a_tokens = CounterMetricFamily(p + "adapter_scheduled_tokens", "Tokens the scheduler ran through the model "
                                       "for an adapter (each position once), by phase", labels=["replica", "adapter", "phase"])
        a_service = GaugeMetricFamily(p + "adapter_service", "The fair scheduler's virtual token counter: weighted "
                                      "tokens served / weight", labels=["replica", "adapter"])
        a_weight = GaugeMetricFamily(p + "adapter_weight", "Fair-share weight", labels=["replica", "adapter"])
        policy = GaugeMetricFamily(p + "scheduling_policy", "The engine's scheduling policy (1 for the one in use)",
                                   labels=["replica", "policy"])

        for snap in self.snapshots:
            r = str(snap.get(SNAPSHOT_REPLICA, "?"))
            m = snap[SNAPSHOT_METRICS]
            for adapter, status, n in m["requests"]:
                requests.add_metric([r, _label(adapter), status], n)
            for adapter, n in m["generated_tokens"].items():
                gen_tokens.add_metric([r, _label(adapter)], n)
            for adapter, n in m["prompt_tokens"].items():
                prompt_tokens.add_metric([r, _label(adapter)], n)
            for family, key in ((ttft, "ttft"), (tpot, "tpot"), (latency, "latency")):
                h = m[key]
                family.add_metric([r], _histogram_buckets(h), h["sum"])
            e = snap[SNAPSHOT_ENGINE]
            bh = batch_size_histogram(e.get("batch_seqs_hist", {}))
            batch.add_metric([r], _histogram_buckets(bh), bh["sum"])
            for adapter, n in e.get("waiting", {}).items():
                queue.add_metric([r, _label(adapter)], n)
            for adapter, n in e.get("running", {}).items():
                running_by_adapter.add_metric([r, _label(adapter)], n)
            # Label values: the engine names at most NONFINITE_ADAPTERS_NAMED adapters, then "__other__".
            for adapter, n in e.get("nonfinite_by_adapter", {}).items():
                nonfinite.add_metric([r, _label(adapter)], n)
            running.add_metric([r], e.get("num_running", 0))
            last_batch.add_metric([r], e.get("last_batch_seqs", 0))
            max_batch.add_metric([r], e.get("max_batch_seqs", 0))
            kv_used.add_metric([r], e.get("kv_blocks_used", 0))
            kv_free.add_metric([r], e.get("kv_blocks_free", 0))
            kv_total.add_metric([r], e.get("kv_blocks_total", 0))
            cache = e.get("prefix_cache") or {}
            pc_queries.add_metric([r], cache.get("queries", 0))
            pc_hits.add_metric([r], cache.get("hits", 0))
            evictable = cache.get("evictable_blocks", 0)
            pc_blocks.add_metric([r, "in_use"], cache.get("cached_blocks", 0) - evictable)
            pc_blocks.add_metric([r, "evictable"], evictable)
            slots.add_metric([r], e.get("adapter_slots", 0))
            slots_pinned.add_metric([r], e.get("adapter_slots_pinned", 0))
            steps.add_metric([r], e.get("steps", 0))
            preemptions.add_metric([r], e.get("preemptions", 0))
            chunks.add_metric([r], m.get("stream_chunks", 0))
            deltas.add_metric([r], m.get("stream_deltas", 0))
            pool = e.get("adapters") or {}
            for tier in ("device", "host"):
                a_hits.add_metric([r, tier], pool.get(f"{tier}_hits", 0))
                a_misses.add_metric([r, tier], pool.get(f"{tier}_misses", 0))
                a_evictions.add_metric([r, tier], pool.get(f"{tier}_evictions", 0))
            a_loads.add_metric([r, "host"], pool.get("source_loads", 0))
            a_loads.add_metric([r, "device"], pool.get("device_misses", 0))
            a_load_failures.add_metric([r], pool.get("load_failures", 0))
            a_bytes.add_metric([r, "host"], pool.get("host_bytes", 0))
            a_bytes.add_metric([r, "device"], pool.get("device_adapter_bytes", 0))
            a_capacity.add_metric([r, "host"], pool.get("host_cache_bytes", 0))
            a_capacity.add_metric([r, "device"], pool.get("device_slot_bytes", 0))
            for state in ("registered", "host", "device", "loading"):
                a_count.add_metric([r, state], pool.get(f"adapters_{state}", 0))
            load_hist = m.get("adapter_load")
            if load_hist:
                a_load_seconds.add_metric([r], _histogram_buckets(load_hist), load_hist["sum"])
            for adapter, h in (m.get("adapter_ttft") or {}).items():  # bounded by ReplicaMetrics
                a_ttft.add_metric([r, _label(adapter)], _histogram_buckets(h), h["sum"])
            self._fairness(r, e, a_queue_wait, a_queue_wait_max, a_rejections, a_tokens, a_service, a_weight, policy)
        replicas.add_metric([], len(self.snapshots))
        for (route, code), n in sorted(self.http_counts.items()):
            http.add_metric([self.ingress_id, route, code], n)
        yield from (
            requests, gen_tokens, prompt_tokens, ttft, tpot, latency, batch, queue, running_by_adapter, running,
            last_batch, max_batch, kv_used, kv_free, kv_total, pc_queries, pc_hits, pc_blocks, slots, slots_pinned, steps, preemptions, chunks, deltas,
            replicas, http, a_hits, a_misses, a_loads, a_load_failures, a_evictions, a_load_seconds, a_bytes,
            a_capacity, a_count, nonfinite, a_ttft, a_queue_wait, a_queue_wait_max, a_rejections, a_tokens, a_service,
            a_weight, policy,
        )

    @staticmethod
    def _fairness(r: str, engine: Mapping[str, Any], queue_wait: SummaryMetricFamily, queue_wait_max: GaugeMetricFamily,
                  rejections: CounterMetricFamily, tokens: CounterMetricFamily, service: GaugeMetricFamily,
                  weight: GaugeMetricFamily, policy: GaugeMetricFamily) -> None:
        """One replica's fair-share accounts: counters folded past ADAPTER_LABELS_NAMED adapters, the gauges
        (a counter level, a weight, a maximum: nothing to add up) for the named adapters only."""
        if engine.get("scheduling_policy"):
            policy.add_metric([r, str(engine["scheduling_policy"])], 1)
        accounts: Mapping[str, Mapping[str, Any]] = engine.get("fairness") or {}
        for adapter, c in fold_adapters(accounts, FAIRNESS_COUNTERS).items():
            queue_wait.add_metric([r, adapter], count_value=c["admitted"], sum_value=c["queue_wait_s_sum"])
            for key, reason in REJECTION_REASONS:
                rejections.add_metric([r, adapter, reason], c[key])
            tokens.add_metric([r, adapter, "prefill"], c["prefill_tokens"])
            tokens.add_metric([r, adapter, "decode"], c["decode_tokens"])
        for adapter, a in list(accounts.items())[:ADAPTER_LABELS_NAMED]:
            queue_wait_max.add_metric([r, _label(adapter)], float(a.get("queue_wait_s_max", 0.0)))
            service.add_metric([r, _label(adapter)], float(a.get("service", 0.0)))
            weight.add_metric([r, _label(adapter)], float(a.get("weight", 1.0)))


def render_prometheus(snapshots: Sequence[Mapping[str, Any]], http_counts: Mapping[tuple[str, str], int],
                      ingress_id: str = "local") -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots, http_counts, ingress_id))
    return generate_latest(registry)
