"""Scheduler and block manager without a model: fairness, bounds, preemption, no leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.errors import OverloadedError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import SeqStatus, Sequence


class AllResident:
    def __init__(self) -> None:
        self.pins: dict[str, int] = {}

    def acquire(self, adapter_id: str) -> int | None:
        self.pins[adapter_id] = self.pins.get(adapter_id, 0) + 1
        return 0

    def release(self, adapter_id: str, slot: int) -> None:
        self.pins[adapter_id] -= 1


def seq(i: int, adapter: str | None, prompt_len: int = 4) -> Sequence:
    return Sequence(f"r{i}", adapter, list(range(prompt_len)), SamplingParams(max_new_tokens=8), float(i))


def fake_step(s: Scheduler) -> list[Sequence]:
    batch = s.schedule()
    for item in batch.prefills + batch.decodes:
        item.seq.num_computed += item.num_tokens
        if item.samples:
            item.seq.output_ids.append(1)
    return [item.seq for item in batch.prefills + batch.decodes]


def test_round_robin_across_adapters_no_starvation() -> None:
    s = Scheduler(BlockManager(1000, 16), AllResident(), max_num_seqs=4, max_num_batched_tokens=1000, max_waiting=1000)
    # adapter "hot" floods first; "cold" requests arrive after 50 hot ones
    for i in range(50):
        s.add(seq(i, "hot"))
    for i in range(50, 53):
        s.add(seq(i, "cold"))
    s.add(seq(99, None))
    admitted = [x.adapter_id for x in fake_step(s)]
    assert admitted.count("cold") >= 1 and admitted.count(None) == 1 and admitted.count("hot") >= 1


def test_waiting_bound() -> None:
    s = Scheduler(BlockManager(10, 16), AllResident(), max_num_seqs=1, max_num_batched_tokens=64, max_waiting=2)
    s.add(seq(0, "a"))
    s.add(seq(1, "b"))
    with pytest.raises(OverloadedError):
        s.add(seq(2, "a"))


def test_chunked_prefill_respects_budget() -> None:
    s = Scheduler(BlockManager(100, 16), AllResident(), max_num_seqs=8, max_num_batched_tokens=32, max_waiting=10)
    s.add(seq(0, None, prompt_len=100))
    s.add(seq(1, "a", prompt_len=10))
    batch = s.schedule()
    assert batch.num_tokens <= 32
    assert batch.prefills[0].num_tokens == 32 and not batch.prefills[0].samples


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 60), st.sampled_from([None, "a", "b", "c"])), min_size=1, max_size=12),
    blocks=st.integers(5, 20),
    budget=st.integers(8, 64),
)
def test_random_workloads_finish_without_leaks(prompts: list[tuple[int, str | None]], blocks: int, budget: int) -> None:
    bm = BlockManager(blocks, 8)
    res = AllResident()
    s = Scheduler(bm, res, max_num_seqs=6, max_num_batched_tokens=budget, max_waiting=100)
    seqs = []
    for i, (n, adapter) in enumerate(prompts):
        if n + 8 > blocks * 8:
            continue
        x = seq(i, adapter, n)
        seqs.append(x)
        s.add(x)
    for _ in range(2000):
        if not s.has_work():
            break
        for x in fake_step(s):
            if len(x.output_ids) >= x.params.max_new_tokens:
                s.remove(x)
        bm.check_invariants()
    assert not s.has_work()
    assert all(x.status is SeqStatus.FINISHED and len(x.output_ids) == 8 for x in seqs)
    assert bm.num_used == 0 and all(v == 0 for v in res.pins.values())
