"""The three-tier adapter pool: property test of its invariants, swapping, single flight, failures."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from transformers import AutoConfig

from engine import AdapterLoadError, AdapterSpec, SamplingParams, UnknownAdapterError
from engine.adapter_pool import AdapterPool
from engine.errors import AdapterBusyError
from engine.model_arch import ModelArch
from models.synthetic import build_adapter, build_model
from tests.helpers import TinyFamily, make_engine, random_prompts, run_requests


class ManualExecutor:
    """Runs submitted loads only when the test says so, so the state machine controls timing."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        self.jobs.append(lambda: fn(*args))
        return Future()

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:  # Executor API
        pass


@pytest.fixture(scope="module")
def pool_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("pool")
    base = build_model(root / "base", "llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, vocab_size=300)
    sources = {f"a{i}": build_adapter(root / f"a{i}", base, rank=4 + 4 * (i % 3), seed=i) for i in range(6)}
    corrupt = root / "corrupt"
    shutil.copytree(sources["a0"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    sources["corrupt"] = corrupt
    sources["missing"] = root / "missing"
    return base, sources


ADAPTERS = ["a0", "a1", "a2", "a3", "a4", "a5", "corrupt", "missing"]


class PoolMachine(RuleBasedStateMachine):
    """Random requests, completions, loads, failures and unloads; invariants checked after every step."""

    base: Path
    sources: dict[str, Path]

    @initialize()
    def setup(self) -> None:
        arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(self.base)))
        self.executor = ManualExecutor()
        one = build_adapter_bytes(self.sources["a2"])  # the largest adapter
        self.pool = AdapterPool(arch, num_slots=3, max_rank=16, dtype=torch.float32, device="cpu",
                                host_cache_bytes=int(2.5 * one), executor=self.executor, failure_ttl_s=0.0)
        for name in ADAPTERS:
            self.pool.register(AdapterSpec(name, str(self.sources[name])), load_now=False)
        self.running: list[tuple[str, int]] = []
        self.waiting: list[str] = []
        self.failed = 0
        self.served = 0

    def _try_admit(self, name: str) -> bool:
        try:
            self.pool.check_known(name)
        except (UnknownAdapterError, AdapterLoadError):
            self.failed += 1
            return True
        slot = self.pool.acquire(name)
        if slot is None:
            return False
        self.running.append((name, slot))
        return True

    @rule(name=st.sampled_from(ADAPTERS))
    def request(self, name: str) -> None:
        if not self._try_admit(name):
            self.waiting.append(name)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def complete(self, i: int) -> None:
        name, slot = self.running.pop(i % len(self.running))
        self.pool.release(name, slot)
        self.served += 1

    @rule()
    def loads_finish(self) -> None:
        self.executor.run_all()
        failures = {name for name, _ in self.pool.take_failures()}
        still = [n for n in self.waiting if n not in failures]
        self.failed += len(self.waiting) - len(still)
        self.waiting = still

    @rule()
    def retry_waiting(self) -> None:
        self.waiting = [n for n in self.waiting if not self._try_admit(n)]

    @rule(name=st.sampled_from(ADAPTERS[:6]))
    def unload_and_reregister(self, name: str) -> None:
        if name not in self.pool.records:
            return
        pinned = any(n == name for n, _ in self.running)
        if pinned:
            with pytest.raises(AdapterBusyError):
                self.pool.unload(name)
            return
        self.pool.unload(name)
        assert self.pool.tier(name) == "disk" and not self.pool.known(name)
        self.pool.register(AdapterSpec(name, str(self.sources[name])), load_now=False)

    @invariant()
    def bounded_and_consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        slots = self.pool.slots
        assert sum(1 for o in slots.occupant if o is not None) <= slots.num_slots
        assert self.pool.host_bytes <= self.pool.host_cache_bytes
        assert self.pool.host_bytes == sum(r.adapter.nbytes for r in self.pool.records.values() if r.adapter)
        for name, slot in self.running:  # an admitted sequence's adapter stays resident in its pinned slot
            assert slots.occupant[slot] == name
        for slot in range(slots.num_slots):
            assert slots.pins[slot] == sum(1 for _, s in self.running if s == slot)

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        # every request is eventually served or failed with an error
        for _ in range(20):
            while self.running:
                self.complete(0)
            self.loads_finish()
            self.retry_waiting()
            if not self.waiting and not self.running:
                break
        assert not self.waiting and not self.running


def build_adapter_bytes(path: Path) -> int:
    return (path / "adapter_model.safetensors").stat().st_size


def test_pool_state_machine(pool_sources: tuple[Path, dict[str, Path]]) -> None:
    base, sources = pool_sources
    PoolMachine.base, PoolMachine.sources = base, sources
    PoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
    PoolMachine.TestCase().runTest()


# ---- through the engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twelve(families: dict[str, TinyFamily], tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    fam = families["llama"]
    root = tmp_path_factory.mktemp("twelve")
    targets = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "down_proj"), ("k_proj", "v_proj")]
    adapters = {
        f"t{i}": build_adapter(root / f"t{i}", fam.base, rank=[4, 8, 16][i % 3], targets=targets[i % 4], seed=300 + i, std=0.1)
        for i in range(12)
    }
    return TinyFamily("llama", fam.base, adapters)


def test_four_slots_twelve_adapters_match_each_alone(twelve: TinyFamily) -> None:
    alone_engine = make_engine(twelve, max_adapter_slots=12)
    prompts = random_prompts(36, 21, 2, 20)
    requests = [(p, f"t{i % 12}") for i, p in enumerate(prompts)]
    try:
        alone = [asyncio.run(run_requests(alone_engine, [r], 10))[0] for r in requests]
    finally:
        alone_engine.shutdown()
    engine = make_engine(twelve, max_adapter_slots=4, preload_adapters=False)
    try:
        mixed = asyncio.run(run_requests(engine, requests, 10, stagger_s=0.002))
        assert mixed == alone
        stats = engine.stats().adapters
        assert stats.device_evictions > 0 and stats.adapters_device <= 4
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_cold_adapter_read_once_for_twenty_requests(twelve: TinyFamily) -> None:
    engine = make_engine(twelve, preload_adapters=False)
    try:
        outs = asyncio.run(run_requests(engine, [("cold start", "t5")] * 20, 4))
        assert len({tuple(o) for o in outs}) == 1
        assert engine.pool.records["t5"].source_reads == 1
        assert engine.stats().adapters.source_loads == 1
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_failed_loads_fail_their_requests_and_others_go_on(
    families: dict[str, TinyFamily], twelve: TinyFamily, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(twelve.adapters["t0"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    other_base = build_adapter(tmp_path / "other-base", families["qwen2"].base, rank=4)  # different shapes
    wide_base = build_model(tmp_path / "wide", "llama", hidden_size=96, num_heads=4, num_kv_heads=2)
    wrong = build_adapter(tmp_path / "wrong", wide_base, rank=4)
    fam = TinyFamily("llama", twelve.base, {"t0": twelve.adapters["t0"], "corrupt": corrupt,
                                             "missing": tmp_path / "missing", "wrong": wrong})
    del other_base
    engine = make_engine(fam, preload_adapters=False)
    try:
        for name, needle in [("corrupt", "safetensors"), ("missing", "not a directory|neither"), ("wrong", "do not fit")]:
            async def both(name: str = name) -> list[object]:
                params = SamplingParams(max_new_tokens=3)
                return await asyncio.gather(*(engine.complete("x y", params, name) for _ in range(3)), return_exceptions=True)

            results = asyncio.run(both())
            assert all(isinstance(r, AdapterLoadError) for r in results), results
            assert all(__import__("re").search(needle, str(r)) for r in results)
            assert engine.pool.records[name].source_reads == 1  # one read for three requests, no retry loop
            # the next request for a good adapter is served
            ok = asyncio.run(engine.complete("x y", SamplingParams(max_new_tokens=3), "t0"))
            assert ok.generated_tokens == 3
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_dynamic_adapter_loaded_on_first_use(twelve: TinyFamily, tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    shutil.copytree(twelve.adapters["t3"], root / "t3")
    outside = tmp_path / "outside"
    shutil.copytree(twelve.adapters["t4"], outside)
    (root / "escape").symlink_to(outside)
    fam = TinyFamily("llama", twelve.base, {})
    engine = make_engine(fam, allow_dynamic_adapters=True, adapter_source_roots=(str(root),))
    strict = make_engine(fam)
    try:
        out = asyncio.run(engine.complete("dyn", SamplingParams(max_new_tokens=4), str(root / "t3")))
        assert out.generated_tokens == 4 and engine.pool.tier(str(root / "t3")) == "device"
        for bad in [str(outside), str(root / "escape"), str(root / ".." / "outside")]:
            with pytest.raises(UnknownAdapterError):
                asyncio.run(engine.complete("dyn", SamplingParams(max_new_tokens=4), bad))
        with pytest.raises(UnknownAdapterError):  # dynamic loading off: unknown stays unknown
            asyncio.run(strict.complete("dyn", SamplingParams(max_new_tokens=4), str(root / "t3")))
    finally:
        engine.shutdown()
        strict.shutdown()


def test_unload_refused_while_in_use_and_reload(twelve: TinyFamily) -> None:
    engine = make_engine(twelve)

    async def scenario() -> None:
        agen = engine.generate("busy", SamplingParams(max_new_tokens=50, ignore_eos=True), "t1")
        await agen.__anext__()
        with pytest.raises(AdapterBusyError):
            engine.unload_adapter("t1")
        await agen.aclose()

    try:
        asyncio.run(scenario())
        for _ in range(100):
            if not engine.stats().num_running:
                break
            asyncio.run(asyncio.sleep(0.02))
        before = asyncio.run(engine.complete("again", SamplingParams(max_new_tokens=6, ignore_eos=True), "t1")).token_ids
        info = engine.reload_adapter("t1")
        assert info["id"] == "t1" and engine.pool.records["t1"].source_reads == 2
        after = asyncio.run(engine.complete("again", SamplingParams(max_new_tokens=6, ignore_eos=True), "t1")).token_ids
        assert before == after
        engine.unload_adapter("t1")
        with pytest.raises(UnknownAdapterError):
            asyncio.run(engine.complete("gone", SamplingParams(max_new_tokens=2), "t1"))
        described = {a["id"]: a for a in engine.adapter_info()}
        assert "t1" not in described and described["t2"]["rank"] == 16 and described["t2"]["tier"] in ("host", "device")
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
