"""Adapters the engine serves: host copies of validated adapters and the device slots they swap into.

The pool owns the host cache (id -> LoraAdapter) and the LRU order of device slots. `acquire`
returns a pinned slot for a resident adapter, moves a host adapter into a free or least recently
used unpinned slot, and returns None when every slot is pinned (the request waits in its queue).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.adapter_slots import AdapterSlots
from engine.adapters import LoraAdapter, load_peft_adapter
from engine.config import AdapterSpec
from engine.errors import AdapterLoadError, UnknownAdapterError
from engine.hub import resolve_local_dir
from engine.model_arch import ModelArch

ADAPTER_FILE_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "*.md"]


@dataclass
class AdapterRecord:
    spec: AdapterSpec
    adapter: LoraAdapter
    requests_served: int = 0
    last_used: float = 0.0


class AdapterPool:
    def __init__(
        self,
        arch: ModelArch,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        hub_cache_dir: str | None = None,
    ) -> None:
        self.arch = arch
        self.max_rank = max_rank
        self.dtype = dtype
        self.hub_cache_dir = hub_cache_dir
        self.slots = AdapterSlots(arch, num_slots, max_rank, dtype, device)
        self.records: dict[str, AdapterRecord] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.hits = 0
        self.misses = 0

    # ---- registry -----------------------------------------------------------------------------
    def read(self, spec: AdapterSpec) -> LoraAdapter:
        try:
            directory = resolve_local_dir(
                spec.source, spec.revision, self.hub_cache_dir, allow_patterns=ADAPTER_FILE_PATTERNS
            )
        except FileNotFoundError as exc:
            raise AdapterLoadError(spec.adapter_id, str(exc)) from exc
        return load_peft_adapter(spec.adapter_id, Path(directory), self.arch, self.max_rank, self.dtype, spec.source)

    def register(self, spec: AdapterSpec) -> LoraAdapter:
        """Read, validate and keep `spec` in host memory. Raises AdapterLoadError with the reason."""
        adapter = self.read(spec)
        with self._lock:
            self.records[spec.adapter_id] = AdapterRecord(spec, adapter)
            self.loads += 1
        return adapter

    def ids(self) -> list[str]:
        return list(self.records)

    def known(self, adapter_id: str) -> bool:
        return adapter_id in self.records

    def check_known(self, adapter_id: str) -> None:
        if adapter_id not in self.records:
            raise UnknownAdapterError(adapter_id, self.ids())

    # ---- device slots -------------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> int | None:
        with self._lock:
            record = self.records.get(adapter_id)
            if record is None:
                return None
            slot = self.slots.slot_of(adapter_id)
            if slot is None:
                slot = self._free_or_lru_slot()
                if slot is None:
                    self.misses += 1
                    return None
                if self.slots.occupant[slot] is not None:
                    self.evictions += 1
                self.slots.write(slot, record.adapter)
                self.misses += 1
            else:
                self.hits += 1
            self.slots.pin(slot)
            self._slot_lru.move_to_end(slot)
            record.requests_served += 1
            record.last_used = time.time()
            return slot

    def _free_or_lru_slot(self) -> int | None:
        for slot in self._slot_lru:
            if self.slots.occupant[slot] is None:
                return slot
        for slot in self._slot_lru:  # least recently used first
            if self.slots.pins[slot] == 0:
                return slot
        return None

    def release(self, adapter_id: str, slot: int) -> None:
        with self._lock:
            if self.slots.occupant[slot] != adapter_id:
                raise RuntimeError(f"slot {slot} holds {self.slots.occupant[slot]!r}, not {adapter_id!r}")
            self.slots.unpin(slot)

    def pinned_slots(self) -> int:
        return sum(1 for p in self.slots.pins if p)

    def describe(self) -> list[dict[str, object]]:
        out = []
        for adapter_id, record in self.records.items():
            a = record.adapter
            out.append(
                {
                    "id": adapter_id,
                    "source": record.spec.source,
                    "rank": a.rank,
                    "targets": list(a.targets),
                    "bytes": a.nbytes,
                    "tier": "device" if self.slots.slot_of(adapter_id) is not None else "host",
                    "requests_served": record.requests_served,
                    "last_used": record.last_used or None,
                }
            )
        return out
