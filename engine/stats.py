"""What `Engine.stats()` returns: frozen snapshots of the engine's and the adapter pool's state.

A snapshot is taken under the owner's lock, so its numbers agree with each other; its maps are
copies the caller may keep. `as_dict()` is the plain-dict form a replica sends to the ingress for
/metrics and /admin/stats (cheap to pickle, JSON as is). Fields marked `LOCAL` are for the replica
itself (routing, autoscaling, the load-latency histogram) and stay out of it: the wire form keeps
exactly the keys the serve side has always produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LOCAL = {"local": True}  # dataclass field metadata: not part of as_dict()
# Distinct adapters counted by name in `nonfinite_by_adapter` (a metric label each); the rest share one.
NONFINITE_ADAPTERS_NAMED = 256
NONFINITE_OTHER_ADAPTERS = "__other__"


def _wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _wire(getattr(value, f.name)) for f in dataclasses.fields(value) if not f.metadata.get("local")}
    if isinstance(value, Mapping):
        return {k: _wire(v) for k, v in value.items()}
    return value


@dataclass
class EngineCounters:
    """What the engine counts as it runs (owned by EngineCore, engine/engine_core.py; changed under its lock)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    rejected: int = 0  # refused at submit by a waiting bound (OverloadedError)
    queue_timeouts: int = 0  # no first token within max_queue_wait_s (QueueTimeoutError)
    request_timeouts: int = 0  # stopped at request_timeout_s (RequestTimeoutError)
    nonfinite_by_adapter: dict[str, int] = field(default_factory=dict)  # "" = base model
    last_batch_seqs: int = 0
    last_batch_tokens: int = 0
    max_batch_seqs: int = 0
    batch_seqs_hist: dict[int, int] = field(default_factory=dict)

    def record_step(self, num_seqs: int, num_tokens: int, prefill_tokens: int, decode_tokens: int) -> None:
        self.steps += 1
        self.last_batch_seqs = num_seqs
        self.last_batch_tokens = num_tokens
        self.max_batch_seqs = max(self.max_batch_seqs, num_seqs)
        self.batch_seqs_hist[num_seqs] = self.batch_seqs_hist.get(num_seqs, 0) + 1
        self.prefill_tokens += prefill_tokens
        self.decode_tokens += decode_tokens

    def record_nonfinite(self, adapter_id: str | None) -> None:
        """One request stopped for NaN/Inf logits; adapters past NONFINITE_ADAPTERS_NAMED share a label."""
        counts = self.nonfinite_by_adapter
        key = adapter_id or ""
        if key not in counts and len(counts) >= NONFINITE_ADAPTERS_NAMED:
            key = NONFINITE_OTHER_ADAPTERS
        counts[key] = counts.get(key, 0) + 1
        self.failed += 1


@dataclass(frozen=True)
class AdapterPoolStats:
    """The adapter tiers (engine/adapter_pool.py): counts, bytes, hit/miss/eviction counters."""

    adapters_registered: int
    adapters_host: int
    adapters_device: int
    adapters_loading: int
    host_bytes: int
    host_cache_bytes: int
    device_slot_bytes: int
    device_adapter_bytes: int  # bytes of the adapters resident in device slots (their allocation: above)
    device_hits: int
    device_misses: int
    host_hits: int
    host_misses: int
    source_loads: int  # monotonic: reads from the source that succeeded
    load_failures: int
    host_evictions: int
    device_evictions: int
    device_adapters: tuple[str, ...] = field(default=(), metadata=LOCAL)  # ids in device slots, sorted
    # Seconds of the last (at most 4096) reads from the source, oldest first; the last
    # `source_loads - n` of them are the ones since a reader saw `source_loads == n`.
    load_seconds: tuple[float, ...] = field(default=(), metadata=LOCAL)

    def as_dict(self) -> dict[str, Any]:
        return _wire(self)


@dataclass(frozen=True)
class EngineStats:
    """One consistent view of an Engine: load per adapter ("" = base model), KV blocks, counters."""

    running: Mapping[str, int]  # sequences in the running batch, per adapter
    waiting: Mapping[str, int]  # requests waiting for admission, per adapter
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache: Mapping[str, Any]  # queries / hits (tokens), cached and evictable blocks, evictions
    adapter_slots: int
    adapter_slots_pinned: int
    steps: int
    last_batch_seqs: int
    last_batch_tokens: int
    max_batch_seqs: int
    batch_seqs_hist: Mapping[int, int]  # {sequences in a step: steps}
    prefill_tokens: int
    decode_tokens: int
    preemptions: int
    finished: int
    aborted: int
    failed: int
    rejected: int  # refused at submit by a waiting bound (OverloadedError)
    queue_timeouts: int  # no first token within max_queue_wait_s
    request_timeouts: int  # stopped at request_timeout_s
    scheduling_policy: str
    prefill_first_steps: int
    # per adapter: weight, VTC counter, tokens served, admissions, rejections, timeouts, queue waits
    fairness: Mapping[str, Mapping[str, Any]]
    nonfinite_by_adapter: Mapping[str, int]
    grammars: Mapping[str, int]  # compiled-grammar cache: entries, bytes, compiles, hits
    adapters: AdapterPoolStats
    oldest_waiting_age_s: float = field(default=0.0, metadata=LOCAL)  # 0 when nothing waits

    @property
    def load(self) -> int:
        """Sequences this engine holds, running or waiting, over all adapters (routing, autoscaling)."""
        return self.num_running + self.num_waiting

    def as_dict(self) -> dict[str, Any]:
        """The wire form (see the module docstring)."""
        return _wire(self)
