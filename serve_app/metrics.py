"""Metrics: each model replica keeps plain counters and histograms; the ingress renders them.

Why not a prometheus_client registry in every replica: a replica is a Ray actor with no HTTP port
of its own, and Prometheus should scrape one URL (the app's `/metrics`). So each replica keeps
picklable state (`ReplicaMetrics.snapshot()`), the ingress asks every replica for it (a Serve
broadcast) and renders Prometheus text with `prometheus_client`'s metric families, one `replica`
label per replica. Counters stay monotonic per replica, as Prometheus expects.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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

BASE_LABEL = "__base__"  # the `adapter` label value of requests for the base model
# Per-adapter families name the first ADAPTER_LABELS_NAMED adapters a replica has seen and fold the
# rest into OTHER_ADAPTERS_LABEL (counters summed), so a deployment with thousands of adapters keeps
# a bounded number of series. "First seen" never changes for a replica (its tables only grow, in
# insertion order), so a folded counter never goes down. The engine bounds its own per-adapter
# NaN/Inf counts the same way (engine.engine.NONFINITE_ADAPTERS_NAMED).
ADAPTER_LABELS_NAMED = 256
OTHER_ADAPTERS_LABEL = "__other__"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Adapter reads from disk take milliseconds; Hub downloads of big adapters take minutes.
ADAPTER_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class Histogram:
    """Cumulative-at-render histogram: per-bucket counts, sum and count (Prometheus semantics)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float, n: int = 1) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.total += value * n
        self.count += n

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total, "count": self.count}


class ReplicaMetrics:
    """Request-level metrics of one model replica. Thread-safe (updated from the replica's loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (adapter, status) -> count
        self.generated_tokens: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.adapter_ttft: dict[str, Histogram] = {}  # the same per adapter (bounded: ADAPTER_LABELS_NAMED)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.stream_chunks = 0  # messages sent on streaming calls ...
        self.stream_deltas = 0  # ... and the token deltas in them (their ratio shows how much was coalesced)
        self.adapter_load = Histogram(ADAPTER_LOAD_BUCKETS)  # source -> host reads (serve_app/core.py feeds it)

    def observe_adapter_load(self, seconds: float) -> None:
        with self._lock:
            self.adapter_load.observe(max(seconds, 0.0))

    def record_chunk(self, deltas: int) -> None:
        with self._lock:
            self.stream_chunks += 1
            self.stream_deltas += deltas

    def record(
        self,
        adapter: str,
        status: str,
        *,
        prompt_tokens: int = 0,
        generated_tokens: int = 0,
        ttft: float | None = None,
        tpot: float | None = None,
        latency: float | None = None,
    ) -> None:
        with self._lock:
            key = (adapter, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if generated_tokens:
                self.generated_tokens[adapter] = self.generated_tokens.get(adapter, 0) + generated_tokens
            if prompt_tokens:
                self.prompt_tokens[adapter] = self.prompt_tokens.get(adapter, 0) + prompt_tokens
            if ttft is not None:
                self.ttft.observe(max(ttft, 0.0))
                label = adapter if adapter in self.adapter_ttft or len(self.adapter_ttft) < ADAPTER_LABELS_NAMED \
                    else OTHER_ADAPTERS_LABEL
                self.adapter_ttft.setdefault(label, Histogram(TTFT_BUCKETS)).observe(max(ttft, 0.0))
            if tpot is not None:
                self.tpot.observe(max(tpot, 0.0))
            if latency is not None:
                self.latency.observe(max(latency, 0.0))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": [[a, s, n] for (a, s), n in sorted(self.requests.items())],
                "generated_tokens": dict(self.generated_tokens),
                "prompt_tokens": dict(self.prompt_tokens),
                "ttft": self.ttft.to_dict(),
                "adapter_ttft": {adapter: h.to_dict() for adapter, h in self.adapter_ttft.items()},
                "tpot": self.tpot.to_dict(),
                "latency": self.latency.to_dict(),
                "stream_chunks": self.stream_chunks,
                "stream_deltas": self.stream_deltas,
                "adapter_load": self.adapter_load.to_dict(),
            }


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


# Engine.stats()["fairness"] counters per adapter, and the `reason` label of each refusal counter.
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
        # Fair sharing under overload (engine/fair_share.py): per adapter, from Engine.stats()["fairness"].
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
            r = str(snap.get("replica", "?"))
            m = snap["metrics"]
            for adapter, status, n in m["requests"]:
                requests.add_metric([r, _label(adapter), status], n)
            for adapter, n in m["generated_tokens"].items():
                gen_tokens.add_metric([r, _label(adapter)], n)
            for adapter, n in m["prompt_tokens"].items():
                prompt_tokens.add_metric([r, _label(adapter)], n)
            for family, key in ((ttft, "ttft"), (tpot, "tpot"), (latency, "latency")):
                h = m[key]
                family.add_metric([r], _histogram_buckets(h), h["sum"])
            e = snap["engine"]
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
            last_batch, max_batch, kv_used, kv_free, kv_total, slots, slots_pinned, steps, preemptions, chunks, deltas,
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
