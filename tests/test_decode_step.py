"""The decode step's hot path: persistent device inputs, the vectorised sampler, and one host read per step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from engine import SamplingParams
from engine.block_manager import BlockManager
from engine.input_batch import InputBatch
from engine.sampler import SampleRow, sample
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import SeqStatus, Sequence
from tests.helpers import TinyFamily, make_engine, random_prompts

# Every way a tensor's value reaches Python; on CUDA each one waits for the device.
HOST_READS = ["item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy"]


@contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record (not raise: the step runs on the engine's thread) every Tensor -> Python value conversion."""
    reads: list[str] = []
    saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def counting(name: str) -> Callable[..., Any]:
        original = saved[name]

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield reads
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


# ---- one host read per decode step -----------------------------------------------------------------


@pytest.mark.parametrize(
    "attention_backend,lora_backend", [("triton", "triton"), ("native", "auto")], ids=["triton", "cpu-native"]
)
def test_a_decode_step_reads_the_host_once(
    attention_backend: str, lora_backend: str, families: dict[str, TinyFamily]
) -> None:
    fam = families["llama"]
    engine = make_engine(fam, attention_backend=attention_backend, lora_backend=lora_backend)
    runner = engine.runner
    original_run = runner.run
    decode_reads: list[list[str]] = []

    def traced(batch: ScheduledBatch) -> Any:
        if batch.prefills or not batch.decodes:
            return original_run(batch)
        with count_host_reads() as reads:
            result = original_run(batch)
        decode_reads.append(list(reads))
        return result

    runner.run = traced  # type: ignore[method-assign]
    # Every sampling feature in one batch: greedy, temperature, top-k/p, typical-p, both penalties,
    # seeds, top-n logprobs, adapters and the base model.
    params = [
        SamplingParams(max_new_tokens=5, ignore_eos=True),
        SamplingParams(max_new_tokens=5, ignore_eos=True, do_sample=True, temperature=0.7, top_k=20, seed=3),
        SamplingParams(max_new_tokens=5, ignore_eos=True, do_sample=True, top_p=0.8, typical_p=0.9, seed=4),
        SamplingParams(max_new_tokens=5, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(max_new_tokens=5, ignore_eos=True, top_n_tokens=3),
    ]
    adapters = [None, *fam.adapters][: len(params)]

    async def run_all() -> list[Any]:
        prompts = random_prompts(len(params), 5, 3, 9)
        return await asyncio.gather(*(engine.complete(p, sp, a) for p, sp, a in zip(prompts, params, adapters)))

    try:
        outs = asyncio.run(run_all())
        assert all(len(o.token_ids) == 5 for o in outs)
        assert decode_reads, "no decode-only step ran"
        for reads in decode_reads:
            assert reads == ["tolist"], reads  # the sampled tokens (with logprobs and flags), nothing else
        engine.check_idle_invariants()
    finally:
        runner.run = original_run  # type: ignore[method-assign]
        engine.shutdown()


# ---- persistent input batch ---------------------------------------------------------------------------


def _seq(rid: str, prompt: list[int], slot: int = -1) -> Sequence:
    seq = Sequence(rid, None, prompt, SamplingParams(), 0.0)
    seq.status = SeqStatus.RUNNING
    seq.adapter_slot = slot
    return seq


def test_input_batch_builds_positions_slots_and_tables_on_the_device() -> None:
    blocks = BlockManager(32, 4)
    inputs = InputBatch(blocks, torch.device("cpu"), max_rows=2, max_blocks=1)  # both grow below
    a, b, c = _seq("a", list(range(10, 21)), slot=1), _seq("b", [5, 6, 7]), _seq("c", [1, 2], slot=0)
    for seq in (a, b, c):
        blocks.ensure(seq.request_id, seq.num_tokens)
    c.num_computed = 1  # c decodes its second token; a and b prefill (a in a chunk of 7 after 4 cached)
    a.num_computed = 4
    rows = [ScheduledSeq(a, 7), ScheduledSeq(b, 3), ScheduledSeq(c, 1)]
    step = inputs.prepare(rows, num_prefill_seqs=2)

    want_positions = [*range(4, 11), 0, 1, 2, 1]
    assert step.positions.tolist() == want_positions
    assert step.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 20, 5, 6, 7, 2]
    owners = ["a"] * 7 + ["b"] * 3 + ["c"]
    assert step.slot_mapping.tolist() == [blocks.slot(r, p) for r, p in zip(owners, want_positions)]
    assert step.row_seq.tolist() == [0] * 7 + [1] * 3 + [2]
    assert step.context_lens.tolist() == [11, 3, 2]
    assert step.query_start.tolist() == [0, 7, 10, 11]
    assert step.token_slots.tolist() == [1] * 7 + [-1] * 3 + [0]
    for i, rid in enumerate(("a", "b", "c")):
        table = blocks.table(rid)
        assert step.block_tables[i, : len(table)].tolist() == table
        assert (step.block_tables[i, len(table) :] == -1).all()
    assert step.lora is not None and step.lora.any_adapter
    assert (step.lora.seg_starts.tolist(), step.lora.seg_lens.tolist(), step.lora.seg_slots.tolist()) == (
        [0, 7], [7, 3], [1, -1]
    )


def test_input_batch_rows_follow_growth_release_and_reuse() -> None:
    blocks = BlockManager(16, 2)
    inputs = InputBatch(blocks, torch.device("cpu"), max_rows=1, max_blocks=2)
    a = _seq("a", [3, 4, 5, 6, 7])
    blocks.ensure("a", 5)
    step = inputs.prepare([ScheduledSeq(a, 5)], 1)
    assert step.block_tables[0].tolist()[:3] == blocks.table("a")
    a.num_computed = 5
    a.output_ids.append(9)
    a.output_ids.extend([9, 9])  # two more tokens: a grows by a block
    blocks.ensure("a", a.num_tokens)
    a.num_computed = 7
    step = inputs.prepare([ScheduledSeq(a, 1)], 0)
    assert step.block_tables[0, :4].tolist() == blocks.table("a")
    assert step.positions.tolist() == [7]
    assert step.slot_mapping.tolist() == [blocks.slot("a", 7)]
    row_a = inputs.row_of(a)

    # a finishes; b takes its row: a's longer table must not show through past b's blocks
    a.status = SeqStatus.FINISHED
    blocks.free("a")
    b = _seq("b", [1, 2])
    blocks.ensure("b", 2)
    step = inputs.prepare([ScheduledSeq(b, 2)], 1)
    assert inputs.row_of(a) is None and inputs.row_of(b) == row_a and inputs.num_held == 1
    assert step.block_tables[0].tolist() == blocks.table("b") + [-1] * (step.block_tables.shape[1] - 1)

    # b is preempted (its blocks freed) and re-admitted with new ones in the same schedule: rewritten
    blocks.ensure("x", 6)  # someone else takes b's old block first
    blocks.free("b")
    blocks.ensure("b", 2)
    step = inputs.prepare([ScheduledSeq(b, 2)], 1)
    assert step.block_tables[0, :1].tolist() == blocks.table("b")
    assert step.slot_mapping.tolist() == [blocks.slot("b", 0), blocks.slot("b", 1)]


# ---- vectorised sampler = the row-by-row sampler it replaced --------------------------------------------


def _row_by_row(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    """The sampler before vectorisation (one row at a time), as the oracle for seeded and greedy tokens."""
    out = []
    for i, row in enumerate(rows):
        p, x = row.params, logits[i].clone()
        if p.repetition_penalty != 1.0 and row.history:
            ids = torch.tensor(sorted(set(row.history)))
            picked = x.index_select(0, ids)
            x.index_copy_(0, ids, torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty))
        if p.frequency_penalty != 0.0 and row.generated:
            ids = torch.tensor(list(row.generated))
            x -= p.frequency_penalty * torch.zeros_like(x).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
        if p.greedy:
            out.append(int(x.argmax()))
            continue
        x = x / p.temperature
        neg_inf = torch.tensor(float("-inf"))
        if 0 < p.top_k < x.shape[-1]:
            x = torch.where(x < torch.topk(x, p.top_k).values[-1], neg_inf, x)
        if p.top_p < 1.0:
            s, order = torch.sort(x)
            remove_sorted = s.softmax(-1).cumsum(-1) <= (1 - p.top_p)
            remove_sorted[-1] = False
            x = torch.where(torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted), neg_inf, x)
        if p.typical_p < 1.0:
            logp = x.log_softmax(-1)
            entropy = -(torch.nan_to_num(logp) * logp.exp()).sum()
            shift, order = torch.sort((-logp - entropy).abs())
            last = int((x.softmax(-1).gather(0, order).cumsum(-1) < p.typical_p).sum().clamp(max=x.shape[-1] - 1))
            remove = torch.zeros_like(shift, dtype=torch.bool).scatter(0, order, shift > shift[last])
            x = torch.where(remove, neg_inf, x)
        probs = x.softmax(-1)
        u = torch.rand((), generator=row.generator).item()
        cdf = probs.double().cumsum(-1)
        index = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype))), len(probs) - 1)
        out.append(index if probs[index] != 0 else int(probs.argmax()))
    return out


def test_vectorised_sampler_gives_the_row_by_row_tokens() -> None:
    vocab = 300
    kinds = [
        dict(),
        dict(do_sample=True, temperature=0.8),
        dict(do_sample=True, temperature=1.3, top_k=7),
        dict(do_sample=True, top_p=0.7),
        dict(do_sample=True, typical_p=0.6, top_k=50),
        dict(do_sample=True, temperature=0.5, top_p=0.9, typical_p=0.95),
        dict(repetition_penalty=1.8, frequency_penalty=0.7),
        dict(do_sample=True, repetition_penalty=0.7, top_k=1),
        dict(do_sample=True, temperature=2.0, frequency_penalty=-1.0),
    ]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        logits = torch.randn(len(kinds), vocab, generator=gen) * 4
        history = [torch.randint(0, vocab, (12,), generator=gen).tolist() for _ in kinds]

        def rows(seed_base: int, history: list[list[int]] = history) -> list[SampleRow]:
            return [
                SampleRow(SamplingParams(**kind), torch.Generator().manual_seed(seed_base + i), h, h[6:])
                for i, (kind, h) in enumerate(zip(kinds, history))
            ]

        got = sample(logits.clone(), rows(100 * step))
        assert got.nonfinite == ()
        assert got.token_ids == _row_by_row(logits.clone(), rows(100 * step)), step
        want_lp = logits.log_softmax(-1).gather(1, torch.tensor(got.token_ids).unsqueeze(1)).squeeze(1)
        assert got.logprobs == want_lp.double().tolist()
