"""The adapter pool's host tier: what is known about each registered adapter (`AdapterRecord`), the
pool's counters, and the host copies of adapter weights, least recently used first within a byte budget.

Used by engine/adapter_pool.py only, under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from engine.adapters import LoraAdapter
from engine.config import AdapterSpec
from engine.errors import AdapterLoadError

LOAD_SECONDS_KEPT = 4096  # latencies of the last reads from the source (engine/stats.py: load_seconds)


@dataclass
class AdapterRecord:
    """Everything known about one registered adapter, whichever tier it is in."""

    spec: AdapterSpec
    adapter: LoraAdapter | None = None  # the host copy; None while only on the source
    rank: int | None = None
    targets: tuple[str, ...] = ()
    nbytes: int = 0
    requests_served: int = 0
    last_used: float = 0.0
    source_reads: int = 0
    dynamic: bool = False
    # Where its files must lie (set at registration): the Hub repo's cache folder, or the allowed
    # root its source is under; neither for an operator-listed directory outside every root.
    from_hub: bool = False
    allowed_root: Path | None = None
    # What the adapter says it was trained on, and whether that is not the served base (a warning:
    # it still loads when its shapes fit).
    base_model_name_or_path: str | None = None
    base_model_mismatch: bool = False


@dataclass
class PoolCounters:
    device_hits: int = 0
    device_misses: int = 0
    host_hits: int = 0
    host_misses: int = 0
    source_loads: int = 0
    load_failures: int = 0
    host_evictions: int = 0
    device_evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)  # the last LOAD_SECONDS_KEPT

    def record_load(self, seconds: float) -> None:
        """One successful read from the source that took `seconds`."""
        self.source_loads += 1
        self.load_seconds.append(seconds)
        if len(self.load_seconds) > LOAD_SECONDS_KEPT:
            del self.load_seconds[: len(self.load_seconds) - LOAD_SECONDS_KEPT]


class HostCache:
    """Host copies of adapter weights (each record's `adapter`), least recently used first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._lru: OrderedDict[str, AdapterRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, record: AdapterRecord, adapter: LoraAdapter) -> int:
        """Make `adapter` the record's host copy, evicting the least recently used copies to fit it.

        Returns how many were evicted; raises AdapterLoadError for an adapter larger than the budget.
        """
        if adapter.nbytes > self.budget_bytes:
            raise AdapterLoadError(
                adapter.adapter_id, f"needs {adapter.nbytes} bytes, more than host_cache_bytes={self.budget_bytes}"
            )
        self.drop(adapter.adapter_id)
        evicted = 0
        # Any host copy may go, also one whose adapter sits in a device slot (the slot keeps working).
        while self.nbytes + adapter.nbytes > self.budget_bytes and self._lru:
            self.drop(next(iter(self._lru)))
            evicted += 1
        record.adapter = adapter
        self._lru[adapter.adapter_id] = record
        self.nbytes += adapter.nbytes
        return evicted

    def drop(self, adapter_id: str) -> None:
        record = self._lru.pop(adapter_id, None)
        if record is not None and record.adapter is not None:
            self.nbytes -= record.adapter.nbytes
            record.adapter = None

    def touch(self, adapter_id: str) -> None:
        """`adapter_id`'s copy was just used: it is evicted last."""
        if adapter_id in self._lru:
            self._lru.move_to_end(adapter_id)
