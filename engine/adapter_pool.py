"""Where adapters live: source (disk / Hub) -> host cache (LRU, byte budget) -> device slots (LRU, pinned).

The pool owns every tier's bookkeeping. `acquire(adapter_id)` is what the scheduler calls when a
sequence wants to start: it returns a pinned device slot, or None when the adapter is not resident
yet. In that case a background load from the source starts (one per adapter however many requests
wait: single flight), the request stays in its adapter queue while other adapters keep decoding,
and `on_ready` wakes the engine when the load finishes. A failed load is remembered for
`failure_ttl_s` and handed to the engine (`take_failures`) to fail the waiting requests, so a
broken adapter is not retried in a loop. Every load, background or synchronous, is bounded by
`load_timeout_s` (engine/adapter_loads.py): a hung one fails its requests at the deadline and
stops holding back the loads of other adapters.

Reads are confined (engine/adapter_source.py): an adapter registered from a Hub id is read only
from that repo's folder in the Hub cache, one whose source lies under an `adapter_source_roots`
root only from under that root, every file resolved again at every read. Adapters the operator
listed outside every root are read where they are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.adapter_config import base_model_mismatch
from engine.adapter_loads import LoadJob, LoadRunner
from engine.adapter_slots import AdapterSlots
from engine.adapter_source import check_source, is_hub_id, root_of
from engine.adapter_weights import BIN_FILE, SAFETENSORS_FILE, WEIGHT_FILES
from engine.adapters import CONFIG_FILE, LoraAdapter, load_peft_adapter
from engine.config import AdapterSpec
from engine.errors import AdapterBusyError, AdapterLoadError, UnknownAdapterError
from engine.hub import hub_repo_dir, resolve_local_dir
from engine.model_arch import ModelArch

ADAPTER_FILE_PATTERNS = [CONFIG_FILE, SAFETENSORS_FILE, "*.md"]
log = logging.getLogger(__name__)


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
    load_seconds: list[float] = field(default_factory=list)  # bounded: see _record_latency


class AdapterPool:
    def __init__(
        self,
        arch: ModelArch,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        host_cache_bytes: int = 2 * 1024**3,
        hub_cache_dir: str | None = None,
        allow_dynamic: bool = False,
        local_roots: tuple[str, ...] = (),
        failure_ttl_s: float = 30.0,
        executor: Executor | None = None,
        on_ready: Callable[[], None] | None = None,
        load_timeout_s: float = 60.0,
        base_model_names: tuple[str, ...] = (),
    ) -> None:
        self.arch = arch
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.host_cache_bytes = host_cache_bytes
        self.hub_cache_dir = hub_cache_dir
        self.allow_dynamic = allow_dynamic
        self.local_roots = tuple(Path(r).resolve() for r in local_roots)
        self._root_spellings = tuple(local_roots)  # as configured: a source spelled under one is confined to it
        self.failure_ttl_s = failure_ttl_s
        self.load_timeout_s = load_timeout_s
        self.base_model_names = base_model_names
        self.slots = AdapterSlots(arch, num_slots, max_rank, dtype, device)
        self.records: dict[str, AdapterRecord] = {}
        self.host_lru: OrderedDict[str, None] = OrderedDict()  # host-resident ids, least recent first
        self.host_bytes = 0
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))
        self._failed: dict[str, tuple[float, AdapterLoadError]] = {}
        self._new_failures: list[tuple[str, AdapterLoadError]] = []
        self._lock = threading.RLock()
        self._executor = executor
        self._loads = LoadRunner(self._load_job, self._lock, load_timeout_s, executor=executor)
        self.on_ready = on_ready or (lambda: None)
        self.counters = PoolCounters()

    # ---- registry -----------------------------------------------------------------------------
    def ids(self) -> list[str]:
        with self._lock:
            return list(self.records)

    def known(self, adapter_id: str) -> bool:
        return adapter_id in self.records

    def check_source(self, source: str) -> None:
        """A source from outside (a request, the admin API) must be a Hub id or a directory under a root.

        Raises PermissionError with the reason; nothing is read before the check passes.
        """
        check_source(source, self.local_roots)

    def register(self, spec: AdapterSpec, *, load_now: bool = True, dynamic: bool = False) -> AdapterRecord:
        """Make `spec` servable. With load_now, read it synchronously (start-up: fail fast on a bad adapter)."""
        with self._lock:
            record = self.records.get(spec.adapter_id)
            created = record is None
            if record is None:
                record = AdapterRecord(spec, dynamic=dynamic)
                self.records[spec.adapter_id] = record
            else:
                record.spec = spec
            record.from_hub = is_hub_id(spec.source)
            record.allowed_root = None if record.from_hub else root_of(spec.source, self._root_spellings)
            self._failed.pop(spec.adapter_id, None)
        if load_now:
            try:
                adapter = self._read_bounded(record)
                with self._lock:
                    self._put_host(record, adapter)
            except Exception:
                if created:
                    with self._lock:
                        self.records.pop(spec.adapter_id, None)
                raise
        return record

    def check_known(self, adapter_id: str) -> None:
        """Raise for an adapter this pool cannot serve; register it first when dynamic loading is on."""
        with self._lock:
            failure = self._failed.get(adapter_id)
            if failure is not None and time.monotonic() - failure[0] < self.failure_ttl_s:
                raise failure[1]
            if adapter_id in self.records:
                return
        if not self.allow_dynamic:
            raise UnknownAdapterError(adapter_id, self.ids())
        try:
            self.check_source(adapter_id)
        except PermissionError as exc:
            raise UnknownAdapterError(adapter_id, self.ids()) from exc
        self.register(AdapterSpec(adapter_id, adapter_id), load_now=False, dynamic=True)

    def unload(self, adapter_id: str) -> None:
        """Forget an adapter. Refused (AdapterBusyError) while a running sequence pins it."""
        with self._lock:
            if adapter_id not in self.records:
                raise UnknownAdapterError(adapter_id, self.ids())
            slot = self.slots.slot_of(adapter_id)
            if slot is not None and self.slots.pins[slot]:
                raise AdapterBusyError(adapter_id, f"in use by {self.slots.pins[slot]} running sequences")
            if slot is not None:
                self.slots.clear(slot)
            self._drop_host(adapter_id)
            del self.records[adapter_id]

    def reload(self, adapter_id: str) -> AdapterRecord:
        """Re-read an adapter from its source (its files changed). Refused while it is pinned."""
        with self._lock:
            record = self.records.get(adapter_id)
            if record is None:
                raise UnknownAdapterError(adapter_id, self.ids())
            slot = self.slots.slot_of(adapter_id)
            if slot is not None and self.slots.pins[slot]:
                raise AdapterBusyError(adapter_id, f"in use by {self.slots.pins[slot]} running sequences")
        adapter = self._read_bounded(record)
        with self._lock:
            slot = self.slots.slot_of(adapter_id)
            if slot is not None and not self.slots.pins[slot]:
                self.slots.clear(slot)
            self._drop_host(adapter_id)
            self._put_host(record, adapter)
        return record

    # ---- source -> host -----------------------------------------------------------------------
    def _read(self, record: AdapterRecord) -> LoraAdapter:
        spec = record.spec
        start = time.perf_counter()
        with self._lock:
            record.source_reads += 1
        try:
            directory = resolve_local_dir(spec.source, spec.revision, self.hub_cache_dir, ADAPTER_FILE_PATTERNS)
            if record.from_hub and not any((Path(directory) / name).exists() for name in WEIGHT_FILES):
                # A repo without safetensors weights: fetch PEFT's older adapter_model.bin, and only
                # then (as PEFT does), from the same commit (the snapshot folder's name).
                directory = resolve_local_dir(spec.source, Path(directory).name, self.hub_cache_dir, [BIN_FILE])
        except FileNotFoundError as exc:
            raise AdapterLoadError(spec.adapter_id, str(exc)) from exc
        root = hub_repo_dir(spec.source, self.hub_cache_dir) if record.from_hub else record.allowed_root
        adapter = load_peft_adapter(spec.adapter_id, Path(directory), self.arch, self.max_rank, self.dtype, spec.source,
                                    allowed_root=root)
        if self.device.startswith("cuda"):
            # Page-locked host copies make the later host-to-device copy asynchronous and fast.
            adapter = _pin_memory(adapter)
        with self._lock:
            self.counters.source_loads += 1
            self._record_latency(time.perf_counter() - start)
        return adapter

    def _read_bounded(self, record: AdapterRecord) -> LoraAdapter:
        """A synchronous read (start-up, admin load and reload) under the same timeout as background ones."""
        try:
            return self._loads.run_now(lambda: self._read(record))
        except TimeoutError as exc:
            raise AdapterLoadError(record.spec.adapter_id, str(exc)) from exc

    def _record_latency(self, seconds: float) -> None:
        lat = self.counters.load_seconds
        lat.append(seconds)
        if len(lat) > 4096:
            del lat[: len(lat) - 4096]

    def _put_host(self, record: AdapterRecord, adapter: LoraAdapter) -> None:
        if adapter.nbytes > self.host_cache_bytes:
            raise AdapterLoadError(
                adapter.adapter_id, f"needs {adapter.nbytes} bytes, more than host_cache_bytes={self.host_cache_bytes}"
            )
        self._drop_host(adapter.adapter_id)
        while self.host_bytes + adapter.nbytes > self.host_cache_bytes:
            victim = self._host_victim()
            if victim is None:
                break
            self._drop_host(victim)
            self.counters.host_evictions += 1
        record.adapter = adapter
        record.rank = adapter.rank
        record.targets = adapter.targets
        record.nbytes = adapter.nbytes
        record.base_model_name_or_path = adapter.base_model
        record.base_model_mismatch = base_model_mismatch(adapter.base_model, self.base_model_names)
        if record.base_model_mismatch:
            log.warning("adapter %r names base model %r, which is not the served base %r; its shapes fit, so it "
                        "is served", adapter.adapter_id, adapter.base_model, self.base_model_names[0])
        self.host_lru[adapter.adapter_id] = None
        self.host_bytes += adapter.nbytes

    def _host_victim(self) -> str | None:
        # Any host copy may go, also one whose adapter sits in a device slot (the slot keeps working).
        return next(iter(self.host_lru), None)

    def _drop_host(self, adapter_id: str) -> None:
        if adapter_id in self.host_lru:
            del self.host_lru[adapter_id]
            record = self.records.get(adapter_id)
            if record is not None and record.adapter is not None:
                self.host_bytes -= record.adapter.nbytes
                record.adapter = None

    def _start_load(self, adapter_id: str) -> None:
        if self._loads.pending(adapter_id):
            return
        failure = self._failed.get(adapter_id)
        if failure is not None and time.monotonic() - failure[0] < self.failure_ttl_s:
            # Failed moments ago: hand the same error to the engine again for requests that were
            # queued after it failed the first batch; reading the source again now would be the
            # retry loop we promise not to do.
            self._new_failures.append((adapter_id, failure[1]))
            return
        # Counted per load, not per retry: the scheduler asks again every step while it waits.
        self.counters.host_misses += 1
        self._loads.submit(adapter_id)

    def _load_job(self, job: LoadJob) -> None:
        adapter_id = job.adapter_id
        record = self.records.get(adapter_id)
        try:
            if record is None:
                return
            adapter = self._read(record)
            with self._lock:
                # Not given up on (timed out) and not unloaded meanwhile.
                if not job.abandoned and self.records.get(adapter_id) is record:
                    self._put_host(record, adapter)
        except Exception as exc:  # any failure becomes the waiting requests' error
            error = exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(adapter_id, repr(exc))
            with self._lock:
                if not job.abandoned:
                    self._fail_load(adapter_id, error, record)
        finally:
            self.on_ready()

    def _fail_load(self, adapter_id: str, error: AdapterLoadError, record: AdapterRecord | None) -> None:
        # Under the lock. A dynamic adapter that failed is forgotten (it was never listed).
        self.counters.load_failures += 1
        self._failed[adapter_id] = (time.monotonic(), error)
        self._new_failures.append((adapter_id, error))
        if record is not None and record.dynamic and self.records.get(adapter_id) is record:
            del self.records[adapter_id]

    def take_failures(self) -> list[tuple[str, AdapterLoadError]]:
        """Loads that failed (or timed out) since the last call: the engine fails their waiting requests."""
        with self._lock:
            for job in self._loads.expire():
                error = AdapterLoadError(job.adapter_id, f"load timed out after {self.load_timeout_s:g} s "
                                                         f"(adapter_load_timeout_s)")
                self._fail_load(job.adapter_id, error, self.records.get(job.adapter_id))
            out, self._new_failures = self._new_failures, []
            return out

    # ---- host -> device -----------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> int | None:
        with self._lock:
            record = self.records.get(adapter_id)
            if record is None:
                return None
            slot = self.slots.slot_of(adapter_id)
            if slot is not None:
                self.counters.device_hits += 1
            else:
                if record.adapter is None:
                    self._start_load(adapter_id)
                    return None
                slot = self._free_or_lru_slot()
                if slot is None:  # every slot is pinned by running sequences: wait for one to finish
                    return None
                self.counters.device_misses += 1
                self.counters.host_hits += 1
                if self.slots.occupant[slot] is not None:
                    self.counters.device_evictions += 1
                self.slots.write(slot, record.adapter, non_blocking=self.device.startswith("cuda"))
                self.host_lru.move_to_end(adapter_id)
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

    # ---- introspection ------------------------------------------------------------------------
    def pinned_slots(self) -> int:
        return sum(1 for p in self.slots.pins if p)

    def tier(self, adapter_id: str) -> str:
        if self.slots.slot_of(adapter_id) is not None:
            return "device"
        record = self.records.get(adapter_id)
        return "host" if record is not None and record.adapter is not None else "disk"

    def describe(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {
                    "id": adapter_id,
                    "source": r.spec.source,
                    "revision": r.spec.revision,
                    "rank": r.rank,
                    "targets": list(r.targets),
                    "bytes": r.nbytes,
                    "tier": self.tier(adapter_id),
                    "loading": self._loads.pending(adapter_id),
                    "dynamic": r.dynamic,
                    # Known once read; may be a path, so only the flag belongs on public routes.
                    "base_model_name_or_path": r.base_model_name_or_path,
                    "base_model_mismatch": r.base_model_mismatch,
                    "requests_served": r.requests_served,
                    "last_used": r.last_used or None,
                }
                for adapter_id, r in self.records.items()
            ]

    def stats(self) -> dict[str, object]:
        with self._lock:
            c = self.counters
            return {
                "adapters_registered": len(self.records),
                "adapters_host": len(self.host_lru),
                "adapters_device": sum(1 for o in self.slots.occupant if o is not None),
                "adapters_loading": self._loads.count(),
                "host_bytes": self.host_bytes,
                "host_cache_bytes": self.host_cache_bytes,
                "device_slot_bytes": self.slots.nbytes,
                # bytes of the adapters resident in device slots (the slots' allocation is device_slot_bytes)
                "device_adapter_bytes": sum(
                    self.records[o].nbytes for o in self.slots.occupant if o is not None and o in self.records
                ),
                "device_hits": c.device_hits,
                "device_misses": c.device_misses,
                "host_hits": c.host_hits,
                "host_misses": c.host_misses,
                "source_loads": c.source_loads,
                "load_failures": c.load_failures,
                "host_evictions": c.host_evictions,
                "device_evictions": c.device_evictions,
            }

    def shutdown(self) -> None:
        self._loads.shutdown()
        if isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=False, cancel_futures=True)


def _pin_memory(adapter: LoraAdapter) -> LoraAdapter:
    from dataclasses import replace

    from engine.adapters import LoraModuleWeights

    pinned = {
        key: LoraModuleWeights(w.lora_a.pin_memory(), w.lora_b.pin_memory(), w.scaling) for key, w in adapter.weights.items()
    }
    return replace(adapter, weights=pinned)
