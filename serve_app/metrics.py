"""Metrics recording: each model replica keeps plain counters and histograms; the ingress renders them.

Why not a prometheus_client registry in every replica: a replica is a Ray actor with no HTTP port
of its own, and Prometheus should scrape one URL (the app's `/metrics`). So each replica keeps
picklable state (`ReplicaMetrics.snapshot()`), the ingress asks every replica for it (a Serve
broadcast) and renders Prometheus text with `prometheus_client`'s metric families, one `replica`
label per replica (serve_app/metrics_exposition.py). Counters stay monotonic per replica, as
Prometheus expects.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Any

# Per-adapter families name the first ADAPTER_LABELS_NAMED adapters a replica has seen and fold the
# rest into OTHER_ADAPTERS_LABEL (counters summed), so a deployment with thousands of adapters keeps
# a bounded number of series. "First seen" never changes for a replica (its tables only grow, in
# insertion order), so a folded counter never goes down. The engine bounds its own per-adapter
# NaN/Inf counts the same way (NONFINITE_ADAPTERS_NAMED, engine/stats.py).
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
