"""CUDA-graph decode, the parts that run without a GPU: buckets, when graphs are used, and the static-buffer
copy path (padding included) run eagerly on the CPU against the unpadded step (Triton's interpreter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from engine import SamplingParams
from engine.attention import AttentionBatch, KernelRows, KVCache
from engine.block_manager import BlockManager
from engine.cuda_graphs import (
    Captured,
    DecodeGraphs,
    StaticDecodeInputs,
    bucket_for,
    capture_sizes,
    enabled,
    lora_layout,
)
from engine.model import LoraContext
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import SeqStatus, Sequence
from kernels.lora_ops import LoraOps
from tests.helpers import TinyFamily, make_engine

pytest.importorskip("triton")


def test_buckets_cover_the_batch_and_pad_little() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(64)[-3:] == [48, 56, 64]
    assert capture_sizes(10_000)[-1] == 512
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 8, 9, 63, 64)] == [1, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65, sizes) is None and bucket_for(0, sizes) is None  # eager


def test_graphs_only_on_cuda_with_the_triton_paths_and_not_eager() -> None:
    assert enabled("cuda", "triton", "auto", enforce_eager=False)
    assert not enabled("cuda", "triton", "auto", enforce_eager=True)
    assert not enabled("cuda", "torch", "auto", enforce_eager=False)
    assert not enabled("cuda", "triton", "torch", enforce_eager=False)  # the reference LoRA ops sync
    assert not enabled("cpu", "triton", "triton", enforce_eager=False)


def test_a_cpu_engine_never_captures(families: dict[str, TinyFamily]) -> None:
    engine = make_engine(families["llama"], enforce_eager=False)
    try:
        assert engine.runner.graphs is None
        assert engine.kv.pad_slot is None  # no pad block off CUDA
    finally:
        engine.shutdown()


def _running(rid: str, prompt: list[int], slot: int) -> Sequence:
    seq = Sequence(rid, None, prompt, SamplingParams(), 0.0)
    seq.status = SeqStatus.RUNNING
    seq.adapter_slot = slot
    return seq


def test_padded_static_buffers_give_the_eager_decode_step(families: dict[str, TinyFamily]) -> None:
    """Stage a decode step of 3 rows into a bucket of 4, run the forward over the static buffers (what a
    graph replays): the 3 rows' hidden states equal the eager step's, bit for bit, and the padding row
    writes nothing but the pad slot."""
    fam = families["llama"]
    engine = make_engine(fam, attention_backend="triton", lora_backend="triton")
    try:
        arch, slots = engine.arch, engine.pool.slots
        adapter_slots = []
        for name in ("qv-r4", "all-r64"):  # resident, so their stacks hold real weights
            slot = engine.pool.acquire(name)
            assert slot is not None
            adapter_slots.append(slot)
        block_size = 4
        blocks = BlockManager(40, block_size)
        kv = KVCache(arch.num_layers, 40, block_size, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu",
                     pad_block=True)
        assert kv.pad_slot == 40 * block_size
        lora_ops = LoraOps("triton")
        runner = ModelRunner(engine.model, kv, blocks, slots, lora_ops, "cpu", attention_backend="triton",
                             max_num_seqs=8, max_model_len=64)
        seqs = [_running("a", [5, 9, 13, 2, 7], adapter_slots[0]), _running("b", [3, 4, 8, 21, 6, 30, 11], -1),
                _running("c", [17, 19, 23], adapter_slots[1])]
        for seq in seqs:  # prefill each, then one decode token of the sampled token
            blocks.ensure(seq.request_id, seq.num_tokens)
            result = runner.run(ScheduledBatch([ScheduledSeq(seq, seq.num_tokens)], [], []))
            seq.num_computed = seq.num_tokens
            seq.output_ids.append(result.sampled[0].token_id)
            blocks.ensure(seq.request_id, seq.num_tokens)
        step = runner.inputs.prepare([ScheduledSeq(s, 1) for s in seqs], 0)
        assert step.lora is not None

        eager_attn = AttentionBatch(step.positions, step.slot_mapping, [], 0, [],
                                    kernel_rows=KernelRows(step.block_tables, step.context_lens,
                                                           step.query_start[:1], 0))
        eager = engine.model(step.input_ids, eager_attn, kv, LoraContext(slots.layers, step.lora, lora_ops))
        cache_k, cache_v = kv.k.clone(), kv.v.clone()

        static = StaticDecodeInputs(8, runner.inputs.table.shape[1], kv.pad_slot, torch.device("cpu"))
        bucket = bucket_for(3, capture_sizes(8))
        assert bucket == 4
        static.stage(step, bucket)
        assert static.slot_mapping[3].item() == kv.pad_slot and static.token_slots[3].item() == -1
        assert static.context_lens[3].item() == 0
        ids, attn, lora = static.batches(bucket, slots.layers, lora_ops)
        assert lora is not None
        replayed = engine.model(ids, attn, kv, lora)
        assert replayed.shape[0] == 4
        assert torch.equal(replayed[:3], eager)
        pad = slice(kv.pad_slot, kv.pad_slot + block_size)
        owned = slice(0, kv.pad_slot)
        assert torch.equal(kv.k[:, owned], cache_k[:, owned]) and torch.equal(kv.v[:, owned], cache_v[:, owned])
        assert not torch.equal(kv.k[:, pad], cache_k[:, pad])  # the padding row wrote there, and only there

        # a prefill step never goes into a decode graph
        prefill = runner.inputs.prepare([ScheduledSeq(seqs[0], 1), ScheduledSeq(seqs[1], 1)], 1)
        with pytest.raises(ValueError, match="decode rows only"):
            static.stage(prefill, 4)
        assert lora_layout(slots.layers) == tuple(tuple(sorted(m)) for m in slots.layers)
        for slot in adapter_slots:
            engine.pool.release(slots.occupant[slot], slot)
    finally:
        engine.shutdown()


@dataclass(frozen=True)
class EagerReplay:
    run: Callable[[], object]

    def replay(self) -> None:
        self.run()


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose "graph" runs the recorded forward eagerly on replay: the orchestration (buckets,
    staging, output views, recapture on a new LoRA layout) runs on the CPU as it would on CUDA."""

    def capture(self, bucket: int) -> Captured:
        out = self.forward(bucket).clone()
        self.captures += 1
        return Captured(EagerReplay(lambda: out.copy_(self.forward(bucket))), out)


def test_graph_replays_give_the_eager_tokens_and_recapture_on_a_new_lora_layout(
    families: dict[str, TinyFamily],
) -> None:
    fam = families["llama"]
    engine = make_engine(fam, attention_backend="triton", lora_backend="triton")
    try:
        arch, slots, pool = engine.arch, engine.pool.slots, engine.pool
        block_size = 4
        blocks = BlockManager(40, block_size)
        kv = KVCache(arch.num_layers, 40, block_size, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu",
                     pad_block=True)
        lora_ops = LoraOps("triton")
        runner = ModelRunner(engine.model, kv, blocks, slots, lora_ops, "cpu", attention_backend="triton",
                             max_num_seqs=8, max_model_len=64)
        held: list[tuple[str, int]] = []

        def admit(rid: str, prompt: list[int], adapter: str | None) -> Sequence:
            slot = -1
            if adapter is not None:
                got = pool.acquire(adapter)
                assert got is not None
                slot = got
                held.append((adapter, slot))
            seq = _running(rid, prompt, slot)
            blocks.ensure(rid, seq.num_tokens)
            result = runner.run(ScheduledBatch([ScheduledSeq(seq, seq.num_tokens)], [], []))
            seq.num_computed = seq.num_tokens
            seq.output_ids.append(result.sampled[0].token_id)
            return seq

        def decode(seqs: list[Sequence]) -> list[tuple[int, float]]:
            for seq in seqs:
                blocks.ensure(seq.request_id, seq.num_tokens)
            result = runner.run(ScheduledBatch([], [ScheduledSeq(s, 1) for s in seqs], []))
            return [(t.token_id, t.logprob) for t in result.sampled]

        seqs = [admit("a", [5, 9, 13, 2, 7], "qv-r4"), admit("b", [3, 4, 8, 21, 6, 30, 11], None)]
        want = decode(seqs)  # eager (no graphs yet); decoding the same step again rewrites the same K/V
        runner.graphs = EagerGraphs(engine.model, kv, slots.layers, lora_ops, 8, runner.inputs.table.shape[1],
                                    torch.device("cpu"))
        assert decode(seqs) == want
        assert (runner.graphs.captures, runner.graphs.replays) == (1, 1)  # bucket 2
        assert decode(seqs) == want
        assert (runner.graphs.captures, runner.graphs.replays) == (1, 2)  # replayed, not recaptured

        # an adapter on the MLP too: new LoRA stacks, so the old graph would skip them
        seqs.append(admit("c", [17, 19, 23], "all-r64"))
        graphs, runner.graphs = runner.graphs, None
        want = decode(seqs)
        runner.graphs = graphs
        assert decode(seqs) == want
        assert (graphs.captures, graphs.replays) == (2, 3)  # bucket 4, captured for the new layout
        for adapter, slot in held:
            pool.release(adapter, slot)
    finally:
        engine.shutdown()
