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

The tiers' parts: reading from the source (confined to its root) is engine/adapter_reader.py, the
records and the host LRU engine/adapter_host_cache.py, the device slots engine/adapter_slots.py.
Adapters the operator listed outside every source root are read where they are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import torch

from engine.adapter_config import base_model_mismatch
from engine.adapter_host_cache import AdapterRecord, HostCache, PoolCounters
from engine.adapter_loads import LoadJob, LoadRunner
from engine.adapter_reader import read_adapter
from engine.adapter_slots import AdapterSlots
from engine.adapter_source import check_source, is_hub_id, root_of
from engine.adapters import LoraAdapter, weights_digest
from engine.config import AdapterSpec
from engine.errors import AdapterBusyError, AdapterLoadError, UnknownAdapterError
from engine.model_arch import ModelArch
from engine.prefix_cache import identity_of
from engine.stats import AdapterPoolStats

log = logging.getLogger(__name__)


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
        self.hub_cache_dir = hub_cache_dir
        self.allow_dynamic = allow_dynamic
        self.local_roots = tuple(Path(r).resolve() for r in local_roots)
        self._root_spellings = tuple(local_roots)  # as configured: a source spelled under one is confined to it
        self.failure_ttl_s = failure_ttl_s
        self.load_timeout_s = load_timeout_s
        self.base_model_names = base_model_names
        self.slots = AdapterSlots(arch, num_slots, max_rank, dtype, device)
        self.records: dict[str, AdapterRecord] = {}
        self.host = HostCache(host_cache_bytes)
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
            slot = self._unpinned_slot(adapter_id)
            if slot is not None:
                self.slots.clear(slot)
            self.host.drop(adapter_id)
            del self.records[adapter_id]

    def reload(self, adapter_id: str) -> AdapterRecord:
        """Re-read an adapter from its source (its files changed). Refused while it is pinned."""
        with self._lock:
            record = self.records.get(adapter_id)
            if record is None:
                raise UnknownAdapterError(adapter_id, self.ids())
            self._unpinned_slot(adapter_id)  # refused now rather than after the read
        adapter = self._read_bounded(record)
        with self._lock:
            # Pinned while the files were read? The slot cannot change under a running sequence, and new
            # weights beside it would leave later requests on the old ones: refused as above.
            slot = self._unpinned_slot(adapter_id)
            if slot is not None:
                self.slots.clear(slot)
            self.host.drop(adapter_id)
            self._put_host(record, adapter)
        return record

    def _unpinned_slot(self, adapter_id: str) -> int | None:
        """The adapter's device slot (None: not on the device); AdapterBusyError while running sequences
        pin it, since its weights cannot change under them. Called under the lock."""
        slot = self.slots.slot_of(adapter_id)
        if slot is not None and self.slots.pins[slot]:
            raise AdapterBusyError(adapter_id, f"in use by {self.slots.pins[slot]} running sequences")
        return slot

    # ---- source -> host -----------------------------------------------------------------------
    def _read(self, record: AdapterRecord) -> LoraAdapter:
        start = time.perf_counter()
        with self._lock:
            record.source_reads += 1
        adapter = read_adapter(record.spec, from_hub=record.from_hub, allowed_root=record.allowed_root, arch=self.arch,
                               max_rank=self.max_rank, dtype=self.dtype, device=self.device,
                               hub_cache_dir=self.hub_cache_dir)
        with self._lock:
            self.counters.record_load(time.perf_counter() - start)
        return adapter

    def _read_bounded(self, record: AdapterRecord) -> LoraAdapter:
        """A synchronous read (start-up, admin load and reload) under the same timeout as background ones."""
        try:
            return self._loads.run_now(lambda: self._read(record))
        except TimeoutError as exc:
            raise AdapterLoadError(record.spec.adapter_id, str(exc)) from exc

    def _put_host(self, record: AdapterRecord, adapter: LoraAdapter) -> None:
        self.counters.host_evictions += self.host.put(record, adapter)
        record.rank = adapter.rank
        record.targets = adapter.targets
        record.nbytes = adapter.nbytes
        record.base_model_name_or_path = adapter.base_model
        record.base_model_mismatch = base_model_mismatch(adapter.base_model, self.base_model_names)
        if record.base_model_mismatch:
            log.warning("adapter %r names base model %r, which is not the served base %r; its shapes fit, so it "
                        "is served", adapter.adapter_id, adapter.base_model, self.base_model_names[0])

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes

    @property
    def host_cache_bytes(self) -> int:
        return self.host.budget_bytes

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
                slot = self.slots.slot_to_fill()
                if slot is None:  # every slot is pinned by running sequences: wait for one to finish
                    return None
                self.counters.device_misses += 1
                self.counters.host_hits += 1
                if self.slots.occupant[slot] is not None:
                    self.counters.device_evictions += 1
                self.slots.write(slot, record.adapter, non_blocking=self.device.startswith("cuda"))
                self.host.touch(adapter_id)
            self.slots.pin(slot)
            self.slots.touch(slot)
            record.requests_served += 1
            record.last_used = time.time()
            return slot

    def cache_identity(self, adapter_id: str, slot: int | None = None) -> str | None:
        """The prefix-cache identity (engine/prefix_cache.py) of `adapter_id`'s weights: those in `slot`
        (pinned by the caller), or without one those acquire() would pin now (its device slot, else its
        host copy); None while neither holds it."""
        with self._lock:
            if slot is None:
                slot = self.slots.slot_of(adapter_id)
            if slot is not None:
                if self.slots.occupant[slot] != adapter_id:
                    return None
                return identity_of(adapter_id, self.slots.digest[slot])
            record = self.records.get(adapter_id)
            if record is None or record.adapter is None:
                return None
            return identity_of(adapter_id, record.adapter.weights_digest or weights_digest(record.adapter.weights))

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

    def stats(self) -> AdapterPoolStats:
        """Counts, bytes and counters of every tier, read together under the pool's lock."""
        with self._lock:
            c = self.counters
            resident = [o for o in self.slots.occupant if o is not None]
            return AdapterPoolStats(
                adapters_registered=len(self.records),
                adapters_host=len(self.host),
                adapters_device=len(resident),
                adapters_loading=self._loads.count(),
                host_bytes=self.host.nbytes,
                host_cache_bytes=self.host.budget_bytes,
                device_slot_bytes=self.slots.nbytes,
                device_adapter_bytes=sum(self.records[o].nbytes for o in resident if o in self.records),
                device_hits=c.device_hits,
                device_misses=c.device_misses,
                host_hits=c.host_hits,
                host_misses=c.host_misses,
                source_loads=c.source_loads,
                load_failures=c.load_failures,
                host_evictions=c.host_evictions,
                device_evictions=c.device_evictions,
                device_adapters=tuple(sorted(o for o in resident if o in self.records)),
                load_seconds=tuple(c.load_seconds),
            )

    def shutdown(self) -> None:
        self._loads.shutdown()
        if isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=False, cancel_futures=True)

