"""CUDA graphs for decode steps: one graph per batch-size bucket, any mix of adapters inside it.

A decode-only step of n sequences (n at most the largest bucket) is padded to the smallest bucket >= n
and replayed from that bucket's graph: the model's forward over static input buffers (token ids,
positions, slot mapping, block tables, context lengths, per-token adapter slots), the Triton paged
decode attention and the Triton BGMV LoRA ops included. The adapter slot of each token is a graph input
and every slot's A/B are zero-padded to the max rank in the slot stacks, so one graph serves any mix of
adapters and ranks; padding rows use slot -1 (no adapter), a context of 0 (the kernel reads nothing and
writes zeros) and write their K/V to the cache's pad slot, which no sequence owns. Logits and sampling
stay eager (as in vLLM), so the graph replaces the step's hundreds of kernel launches with one.

Prefill, mixed prefill + decode steps, batches above the largest bucket, the CPU, the torch or native
attention paths and `EngineConfig.enforce_eager` run eagerly. LoRA stacks of a target module are
allocated on the first adapter that targets it (`engine.adapter_slots`), which changes what the
forward does: graphs are keyed by that layout and recaptured (lazily, per bucket) when it changes.

Memory: all graphs share one memory pool and are captured largest first, so the pool holds about one
largest-bucket forward's activations plus each graph's output; `reserved_bytes` measures that forward
before the KV cache is sized, and the engine takes it off the KV budget.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.attention import AttentionBatch, KernelRows, KVCache
from engine.input_batch import StepInputs
from engine.model import CausalLM, LoraApply, LoraContext, LoraWeights
from kernels.lora_ops import LoraBatch

log = logging.getLogger("engine.cuda_graphs")

# vLLM's default capture sizes: 1, 2, 4, then every multiple of 8 (a padded row costs little in decode).
_SMALL_BUCKETS = (1, 2, 4)
_BUCKET_STEP = 8
MAX_CAPTURED_BATCH = 512
# The measured forward misses a few small buffers (LoRA shrink outputs, Triton split partials).
_RESERVE_MARGIN = 1.25


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket batch sizes for an engine of `max_num_seqs`: up to the first that holds it (at most 512)."""
    candidates = [*_SMALL_BUCKETS, *range(_BUCKET_STEP, MAX_CAPTURED_BATCH + 1, _BUCKET_STEP)]
    top = min(max(1, max_num_seqs), MAX_CAPTURED_BATCH)
    return candidates[: bisect.bisect_left(candidates, top) + 1]


def bucket_for(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds `num_rows` decode rows, or None (then the step runs eagerly)."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) and num_rows > 0 else None


def lora_layout(layers: list[dict[str, LoraWeights]]) -> tuple[tuple[str, ...], ...]:
    """Which LoRA stacks exist, per layer: what a captured forward applies."""
    return tuple(tuple(sorted(modules)) for modules in layers)


class Replayable(Protocol):
    def replay(self) -> None: ...


@dataclass
class Captured:
    graph: Replayable  # a torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [bucket, hidden] the graph's output buffer


class StaticDecodeInputs:
    """The graphs' input buffers, sized for the largest bucket, and the copy of a step into them.

    Device-agnostic (the copy path is tested on the CPU); only capture and replay need CUDA.
    """

    def __init__(self, max_batch: int, max_blocks: int, pad_slot: int, device: torch.device) -> None:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.pad_slot = pad_slot
        self.input_ids = longs(max_batch)
        self.positions = longs(max_batch)
        self.slot_mapping = torch.full((max_batch,), pad_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), -1, dtype=torch.long, device=device)
        self.context_lens = longs(max_batch)
        self.token_slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.query_start = longs(1)  # no prefill rows in a decode graph
        self.no_segments = longs(0)

    def stage(self, step: StepInputs, bucket: int) -> None:
        """Copy a decode-only step's inputs into rows [0, n) and make rows [n, bucket) padding."""
        n, width = step.block_tables.shape
        if step.num_prefill_tokens or n > bucket or bucket > self.max_batch or width > self.max_blocks:
            raise ValueError(f"a decode graph takes decode rows only, at most {self.max_batch} of {self.max_blocks} blocks")
        self.input_ids[:n].copy_(step.input_ids, non_blocking=True)
        self.positions[:n].copy_(step.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(step.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(step.context_lens, non_blocking=True)
        self.token_slots[:n].copy_(step.token_slots, non_blocking=True)
        self.block_tables[:n, :width].copy_(step.block_tables, non_blocking=True)
        self.block_tables[:n, width:].fill_(-1)
        if n < bucket:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.slot_mapping[n:bucket].fill_(self.pad_slot)
            self.context_lens[n:bucket].zero_()
            self.token_slots[n:bucket].fill_(-1)
            self.block_tables[n:bucket].fill_(-1)

    def batches(self, bucket: int, layers: list[dict[str, LoraWeights]], lora_ops: LoraApply) -> tuple[
        torch.Tensor, AttentionBatch, LoraContext | None
    ]:
        """The forward's arguments over the first `bucket` rows of the buffers (views: no copies)."""
        attn = AttentionBatch(
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            prefills=[],
            num_prefill_tokens=0,
            decode_groups=[],
            kernel_rows=KernelRows(self.block_tables[:bucket], self.context_lens[:bucket], self.query_start, 0),
        )
        lora = None
        if any(layers):  # some adapter targets a module: every replay applies the stacks (slot -1 adds 0)
            batch = LoraBatch(self.token_slots[:bucket], 0, self.no_segments, self.no_segments, self.no_segments, True)
            lora = LoraContext(layers, batch, lora_ops)
        return self.input_ids[:bucket], attn, lora


class DecodeGraphs:
    """Captures (lazily, per bucket and LoRA layout) and replays the decode forward; CUDA only."""

    def __init__(
        self,
        model: CausalLM,
        kv: KVCache,
        layers: list[dict[str, LoraWeights]],
        lora_ops: LoraApply,
        max_num_seqs: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        if kv.pad_slot is None:
            raise ValueError("CUDA graphs need a KV cache with a pad slot (KVCache(pad_block=True))")
        self.model = model
        self.kv = kv
        self.layers = layers
        self.lora_ops = lora_ops
        self.sizes = capture_sizes(max_num_seqs)
        self.inputs = StaticDecodeInputs(self.sizes[-1], max_blocks, kv.pad_slot, device)
        self.device = device
        self._graphs: dict[int, Captured] = {}
        self._layout = lora_layout(layers)
        self._pool: tuple[int, int] | None = None  # one memory pool for all graphs, made on the first capture
        self.captures = 0  # graphs captured so far (a layout change recaptures)
        self.replays = 0

    def bucket(self, step: StepInputs) -> int | None:
        if step.num_prefill_tokens or step.block_tables.shape[1] > self.inputs.max_blocks:
            return None
        return bucket_for(step.block_tables.shape[0], self.sizes)

    def forward(self, bucket: int) -> torch.Tensor:
        """The decode forward over the first `bucket` rows of the static buffers (what a graph records)."""
        ids, attn, lora = self.inputs.batches(bucket, self.layers, self.lora_ops)
        return self.model(ids, attn, self.kv, lora)

    def capture(self, bucket: int) -> Captured:
        """Record the bucket's decode forward in a CUDA graph (tests without a GPU replace this)."""
        # Padding rows only (what a replay's padding is): the warm-up compiles every Triton kernel the
        # graph launches, on a side stream as torch.cuda.graphs requires.
        self.inputs.block_tables[:bucket].fill_(-1)
        self.inputs.context_lens[:bucket].zero_()
        self.inputs.slot_mapping[:bucket].fill_(self.inputs.pad_slot)
        self.inputs.token_slots[:bucket].fill_(-1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (adapter loads, the caller's loop) stay legal while
        # this thread captures; the default ("global") would fail them.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self.forward(bucket)
        self.captures += 1
        return Captured(graph, hidden)

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (so the smaller ones reuse its pool memory)."""
        for bucket in reversed(self.sizes):
            if bucket not in self._graphs:
                self._graphs[bucket] = self.capture(bucket)

    def run(self, step: StepInputs, bucket: int) -> torch.Tensor:
        """The step's hidden states [n, hidden] from the bucket's graph (a view of its output buffer)."""
        layout = lora_layout(self.layers)
        if layout != self._layout:  # an adapter brought a new target module: the old graphs skip it
            log.info("LoRA stacks changed; recapturing CUDA graphs")
            self._graphs.clear()
            self._pool = None  # the old graphs' memory goes back with them
            self._layout = layout
        captured = self._graphs.get(bucket)
        if captured is None:
            captured = self._graphs[bucket] = self.capture(bucket)
        self.inputs.stage(step, bucket)
        captured.graph.replay()
        self.replays += 1
        return captured.hidden[: step.block_tables.shape[0]]


def enabled(device: torch.device | str, attention_backend: str, lora_backend: str, enforce_eager: bool) -> bool:
    """Whether decode steps replay CUDA graphs: on CUDA, with the Triton attention (resolved backend) and a
    LoRA backend that is not the torch reference (its ops read sizes back to the host), unless eager."""
    return (
        torch.device(device).type == "cuda"
        and attention_backend == "triton"
        and lora_backend != "torch"
        and not enforce_eager
    )


def reserved_bytes(model: CausalLM, max_num_seqs: int, block_size: int, device: torch.device) -> int:
    """Device bytes the decode graphs' pool will hold, measured before the KV cache exists.

    One eager forward of the largest bucket over a one-block cache (all rows padding: what capture runs)
    gives its activation peak; every graph also keeps its output buffer.
    """
    arch = model.arch
    dtype = model.embed_tokens.weight.dtype
    bucket = capture_sizes(max_num_seqs)[-1]
    kv = KVCache(arch.num_layers, 1, block_size, arch.num_kv_heads, arch.head_dim, dtype, device, pad_block=True)
    inputs = StaticDecodeInputs(bucket, 1, kv.pad_slot or 0, device)
    ids, attn, _ = inputs.batches(bucket, [], None)  # type: ignore[arg-type]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(ids, attn, kv, None)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    itemsize = torch.empty((), dtype=dtype).element_size()
    outputs = sum(capture_sizes(max_num_seqs)) * arch.hidden_size * itemsize
    del kv, inputs
    return int((peak + outputs) * _RESERVE_MARGIN)
