"""The CPU fast path against its references: the native ops (engine/native_ops.py, engine/csrc/) and
the oneDNN linears (engine/cpu_linear.py).

- the op equals the torch path (the reference) on random paged caches: odd lengths and block
  boundaries, GQA ratios 1/3/4, head sizes on its vector path (64, 128) and its generic one (24),
  sliding windows, prefill chunks over cached context beside decode rows, few rows (one work item per
  kv head) and many (one per row); float32 to ~1e-6, bfloat16 / float16 to their rounding;
- it reads nothing but each row's own data: a cache holding NaN/Inf everywhere else gives the same bytes;
- a block table that would read outside the cache is an error, never a stray read;
- the native LoRA op equals kernels/reference.py on mixed batches (base rows untouched, every slot,
  ranks padded, column slices) in float32 and to rounding in bfloat16, and keeps a poisoned slot's
  NaN/Inf out of every other row;
- packed oneDNN linears equal F.linear to float32 rounding, and a packed model gives the same logits;
- LORASERVE_CPU_ATTENTION / LORASERVE_CPU_LINEAR pick the paths; a failed build falls back to torch
  with the reason logged, and a forced native path fails loudly instead;
- the native pointwise ops (norms, rotary, SiLU) give a model the same logits as the reference
  (engine/pointwise.py; the ops themselves: tests/test_pointwise.py);
- engine greedy tokens equal transformers + PEFT with the fast path forced on (mixed adapters in all
  three families, preemption with recompute, a Mistral with an active sliding window).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from engine import cpu_attention, cpu_linear, cpu_lora, cpu_pointwise, native_ops
from engine.attention import (
    AttentionBatch,
    DecodeGroup,
    KVCache,
    PagedRows,
    PrefillSpan,
    block_table_tensor,
    padded_kv_slots,
    paged_attention,
)
from engine.block_manager import BlockManager
from engine.model import CausalLM
from engine.model_arch import ModelArch
from engine.pointwise import TORCH as TORCH_POINTWISE
from kernels.lora_ops import LoraBatch, LoraOps
from models.synthetic import build_adapter, build_model
from tests.helpers import PeftOracle, TinyFamily, make_engine, random_prompts, run_requests

NO_COMPILER = not any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))
# Without a compiler the fallback is the designed behaviour; with one, the op must build.
needs_native = pytest.mark.skipif(NO_COMPILER, reason="no C++ compiler: the torch path is used")


@pytest.fixture(scope="module")
def library() -> native_ops.Library:
    lib = native_ops.library()
    assert lib is not None, f"a C++ compiler is installed, so the native ops must build: {native_ops.LOADER.failure}"
    return lib


@pytest.fixture(scope="module")
def op(library: native_ops.Library) -> cpu_attention.NativeOp:
    return library.paged_attention


# ---- op vs the torch path ------------------------------------------------------------------------


@dataclass
class Step:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv: KVCache
    torch_batch: AttentionBatch
    native_batch: AttentionBatch


def make_step(
    *,
    seed: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    fill: float = 0.0,
) -> Step:
    """One step over a paged cache: prefill chunks (cached, new) first, then one token per decode row.

    Blocks are handed out round-robin, so every table is scattered over the cache; every slot no
    sequence has written holds `fill`.
    """
    gen = torch.Generator().manual_seed(seed)
    seqs = [(f"p{i}", cached, new) for i, (cached, new) in enumerate(prefills)]
    seqs += [(f"d{i}", n - 1, 1) for i, n in enumerate(decode_lens)]
    blocks = BlockManager(4 + sum(-(-(c + n) // block_size) for _, c, n in seqs), block_size)
    kv = KVCache(1, blocks.num_blocks, block_size, num_kv_heads, head_dim, dtype, "cpu")
    kv.k.fill_(fill)
    kv.v.fill_(fill)
    blocks.ensure("someone-else", block_size)  # block 0: a stranger's data
    grown = True
    while grown:
        grown = False
        for sid, cached, new in seqs:
            have = len(blocks.table(sid)) * block_size
            if have < cached + new:
                blocks.ensure(sid, have + block_size)
                grown = True
    for sid, cached, _ in seqs:
        past = [blocks.slot(sid, p) for p in range(cached)]
        if past:  # context written by earlier steps
            kv.k[0, past] = torch.randn(len(past), num_kv_heads, head_dim, generator=gen).to(dtype)
            kv.v[0, past] = torch.randn(len(past), num_kv_heads, head_dim, generator=gen).to(dtype)
    positions = [p for _, cached, new in seqs for p in range(cached, cached + new)]
    slot_mapping = torch.tensor([blocks.slot(sid, p) for sid, c, n in seqs for p in range(c, c + n)])
    t = len(positions)
    q = torch.randn(t, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype)

    tables = [blocks.table(sid) for sid, _, _ in seqs]
    spans, row0 = [], 0
    for i, (_, cached, new) in enumerate(seqs[: len(prefills)]):
        slots = padded_kv_slots([tables[i]], [cached + new], block_size, "cpu")[0]
        spans.append(PrefillSpan(row0, new, cached + new, slots))
        row0 += new
    groups = []
    if decode_lens:
        groups.append(DecodeGroup(
            start=row0, end=t, kv_slots=padded_kv_slots(tables[len(prefills):], decode_lens, block_size, "cpu"),
            context_lens=torch.tensor(decode_lens), positions=torch.tensor([n - 1 for n in decode_lens]),
        ))
    row_seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([n for _, _, n in seqs]))
    pos = torch.tensor(positions)
    torch_batch = AttentionBatch(pos, slot_mapping, spans, row0, groups)
    native_batch = AttentionBatch(pos, slot_mapping, [], row0, [], PagedRows(block_table_tensor(tables, "cpu"), row_seq))
    return Step(q, k, v, kv, torch_batch, native_batch)


def run_both(step: Step, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    d = step.q.shape[-1]
    ref = paged_attention(step.q, step.k, step.v, step.kv, 0, step.torch_batch, d**-0.5, window)
    got = paged_attention(step.q, step.k, step.v, step.kv, 0, step.native_batch, d**-0.5, window)
    return got, ref


# Lengths around block boundaries (16) and odd ones; the prefill chunks sit on cached context.
DECODE_LENS = [1, 2, 15, 16, 17, 31, 33, 64, 100, 7]
PREFILLS = [(0, 13), (16, 16), (37, 5)]


@needs_native
@pytest.mark.parametrize("head_dim", [64, 128, 24])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(4, 1), (3, 3), (2, 4)])
@pytest.mark.parametrize("window", [None, 7, 16])
def test_native_equals_torch_path_float32(
    op: cpu_attention.NativeOp, head_dim: int, num_kv_heads: int, group: int, window: int | None
) -> None:
    step = make_step(seed=head_dim + 10 * group, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                     decode_lens=DECODE_LENS, prefills=PREFILLS)
    got, ref = run_both(step, window)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-5)


@needs_native
@pytest.mark.parametrize("rows", ["few", "many"])
def test_native_equals_torch_path_with_few_and_many_rows(op: cpu_attention.NativeOp, rows: str) -> None:
    # Few rows run one work item per kv head, many one per row (all its kv heads): same numbers.
    decode_lens = [5, 40] if rows == "few" else [random.Random(3).randint(1, 90) for _ in range(40)]
    step = make_step(seed=4, num_kv_heads=3, group=3, head_dim=64, decode_lens=decode_lens, prefills=[])
    got, ref = run_both(step, None)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-5)


@needs_native
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_native_equals_torch_path_for_other_block_sizes(op: cpu_attention.NativeOp, block_size: int) -> None:
    step = make_step(seed=5, num_kv_heads=2, group=2, head_dim=32, decode_lens=[1, 9, 33, 70],
                     prefills=[(3, 6)], block_size=block_size)
    got, ref = run_both(step, 12)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-5)


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_native_half_precision_matches_float32_of_the_same_inputs(
    op: cpu_attention.NativeOp, dtype: torch.dtype, tol: float
) -> None:
    step = make_step(seed=6, num_kv_heads=3, group=3, head_dim=64, decode_lens=DECODE_LENS, prefills=PREFILLS,
                     dtype=dtype)
    d = step.q.shape[-1]
    got = paged_attention(step.q, step.k, step.v, step.kv, 0, step.native_batch, d**-0.5, None)
    assert got.dtype == dtype
    # The reference: the torch path in float32 over exactly the same (rounded) values.
    kv32 = KVCache(1, step.kv.num_blocks, step.kv.block_size, step.kv.k.shape[2], d, torch.float32, "cpu")
    kv32.k.copy_(step.kv.k)
    kv32.v.copy_(step.kv.v)
    ref = paged_attention(step.q.float(), step.k.float(), step.v.float(), kv32, 0, step.torch_batch, d**-0.5, None)
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


# ---- isolation and safety ------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf"), 1e30])
def test_native_reads_nothing_but_the_rows_own_data(op: cpu_attention.NativeOp, fill: float) -> None:
    def attend(fill_value: float) -> torch.Tensor:
        step = make_step(seed=7, num_kv_heads=2, group=2, head_dim=64, decode_lens=[3, 6, 11, 2, 17],
                         prefills=[(5, 6)], fill=fill_value)
        return run_both(step, None)[0]

    clean = attend(0.0)
    assert torch.isfinite(clean).all()
    assert torch.equal(attend(fill), clean)


@needs_native
def test_a_table_that_reads_outside_the_cache_is_an_error(op: cpu_attention.NativeOp) -> None:
    step = make_step(seed=8, num_kv_heads=2, group=2, head_dim=32, decode_lens=[20, 40], prefills=[])
    rows = step.native_batch.paged_rows
    assert rows is not None
    q, kc, vc, pos = step.q, step.kv.k[0], step.kv.v[0], step.native_batch.positions
    bs = step.kv.block_size

    def call(tables: torch.Tensor, row_seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return op(q, kc, vc, tables, row_seq, positions, bs, 0.1, 0)

    assert torch.isfinite(call(rows.block_tables, rows.row_seq, pos)).all()
    missing = rows.block_tables.clone()
    missing[1, 1] = -1  # a block the row needs
    with pytest.raises(RuntimeError, match="block table entry out of range"):
        call(missing, rows.row_seq, pos)
    beyond = rows.block_tables.clone()
    beyond[0, 0] = step.kv.num_blocks
    with pytest.raises(RuntimeError, match="block table entry out of range"):
        call(beyond, rows.row_seq, pos)
    with pytest.raises(RuntimeError, match="position beyond the block table"):
        call(rows.block_tables, rows.row_seq, pos + 10 * bs)
    with pytest.raises(RuntimeError, match="row_seq out of range"):
        call(rows.block_tables, rows.row_seq + 5, pos)


# ---- choosing the path ---------------------------------------------------------------------------


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_attention.MODE_ENV, raising=False)
    assert cpu_attention.mode() == "auto"
    monkeypatch.setenv(cpu_attention.MODE_ENV, " Torch ")
    assert cpu_attention.mode() == "torch"
    assert cpu_attention.use_native("cpu") is False
    monkeypatch.setenv(cpu_attention.MODE_ENV, "fast")
    with pytest.raises(ValueError, match=r"LORASERVE_CPU_ATTENTION must be one of \('auto', 'native', 'torch'\)"):
        cpu_attention.mode()


def test_a_failed_build_falls_back_with_the_reason_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[tuple[str, ...]] = []

    def failing_build(cflags: tuple[str, ...]) -> native_ops.Library:
        attempts.append(cflags)
        raise RuntimeError("Error building extension:\nfoo.cpp:1:1: error: no compiler here\nninja: build stopped")

    loader = native_ops.NativeLoader(build=failing_build)
    monkeypatch.setenv(cpu_attention.MODE_ENV, "auto")
    with caplog.at_level(logging.WARNING, logger="engine.native_ops"):
        assert cpu_attention.use_native("cpu", loader) is False
        assert cpu_attention.use_native("cpu", loader) is False
    assert len(attempts) == 2 and "-march=native" in attempts[0] and "-march=native" not in attempts[1]
    assert loader.failure is not None and "error: no compiler here" in loader.failure
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the torch paths" in warnings[0].getMessage()
    assert "error: no compiler here" in warnings[0].getMessage()
    # LoRA falls back to the reference just the same.
    assert cpu_lora.for_device(LoraOps("auto"), "cpu", loader).backend == "auto"

    monkeypatch.setenv(cpu_attention.MODE_ENV, "native")
    with pytest.raises(cpu_attention.NativeAttentionUnavailable, match="no compiler here"):
        cpu_attention.use_native("cpu", loader)
    # Other devices never use the CPU op, whatever the mode.
    assert cpu_attention.use_native("meta", loader) is False


def test_build_name_changes_with_the_flags() -> None:
    flags = native_ops.NATIVE_CFLAGS
    assert native_ops.build_name(flags) == native_ops.build_name(flags)
    assert native_ops.build_name(flags) != native_ops.build_name(flags[:-1])


@needs_native
def test_lora_backend_choice(library: native_ops.Library) -> None:
    assert cpu_lora.for_device(LoraOps("auto"), "cpu").backend == "native"
    for backend in ("torch", "triton"):  # asked for by name: kept
        assert cpu_lora.for_device(LoraOps(backend), "cpu").backend == backend
    assert cpu_lora.for_device(LoraOps("auto"), "meta").backend == "auto"


# ---- the native LoRA op vs kernels/reference.py ---------------------------------------------------

S, R, IN, OUT, OFFSET = 5, 16, 72, 40, 8


def _lora_case(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(S, R, IN, generator=gen) * 0.2
    b = torch.randn(S, OUT, R, generator=gen) * 0.2
    a[2, 4:] = 0  # slot 2 holds a rank-4 adapter: the padded rank rows and columns are zero
    b[2, :, 4:] = 0
    scaling = torch.tensor([0.5, 2.0, 1.0, 0.25, 4.0])
    x = torch.randn(37, IN, generator=gen)
    base = torch.randn(37, OUT + 2 * OFFSET, generator=gen)
    return x.to(dtype), base.to(dtype), a.to(dtype), b.to(dtype), scaling


# Prefill segments (one slot each, base among them), then decode rows with mixed slots.
SLOTS = [0] * 9 + [-1] * 5 + [3] * 7 + [1, 4, -1, 2, 2, 0, -1, 3, 1, 1, 4, 2, 0, -1, 3, 2]
NUM_PREFILL = 21


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_native_lora_equals_the_reference(library: native_ops.Library, dtype: torch.dtype, tol: float) -> None:
    x, base, a, b, scaling = _lora_case(dtype, seed=1)
    batch = LoraBatch.build(SLOTS, NUM_PREFILL, "cpu")
    want, got = base.clone(), base.clone()
    LoraOps("torch").apply(x, want, a, b, scaling, batch, OFFSET)
    cpu_lora.NativeLoraOps(library).apply(x, got, a, b, scaling, batch, OFFSET)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    base_rows = [i for i, s in enumerate(SLOTS) if s < 0]
    assert torch.equal(got[base_rows], base[base_rows])  # no adapter: not touched at all
    assert torch.equal(got[:, :OFFSET], base[:, :OFFSET]) and torch.equal(got[:, OFFSET + OUT :], base[:, OFFSET + OUT :])
    assert not torch.equal(got, base)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_lora_reads_b_stored_transposed_in_place_with_the_same_result(
    library: native_ops.Library, dtype: torch.dtype
) -> None:
    # The slot table stores B as [S, R, out] and hands out the [S, out, R] view (engine/adapter_slots.py);
    # the op reads that in place and must give bit for bit what it gives for a contiguous B.
    x, base, a, b, scaling = _lora_case(dtype, seed=4)
    stored = b.transpose(1, 2).contiguous().transpose(1, 2)
    assert stored.stride(1) == 1 and torch.equal(stored, b)
    batch = LoraBatch.build(SLOTS, NUM_PREFILL, "cpu")
    ops = cpu_lora.NativeLoraOps(library)
    got, want = base.clone(), base.clone()
    ops.apply(x, got, a, stored, scaling, batch, OFFSET)
    ops.apply(x, want, a, b, scaling, batch, OFFSET)
    assert torch.equal(got, want) and not torch.equal(got, base)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_lora_gives_a_token_the_same_bits_whoever_shares_its_adapter(
    library: native_ops.Library, dtype: torch.dtype
) -> None:
    # The op computes several tokens of one slot per pass; a token's delta must not depend on how many
    # batch-mates (other requests' tokens) share its adapter, nor on where in the run it sits.
    x, base, a, b, scaling = _lora_case(dtype, seed=6)
    ops = cpu_lora.NativeLoraOps(library)
    alone = []
    for t in range(9):
        row = base[t : t + 1].clone()
        ops.apply(x[t : t + 1], row, a, b, scaling, LoraBatch.build([3], 0, "cpu"), OFFSET)
        alone.append(row)
    for run in range(1, 10):
        slots = [0] * (9 - run) + [3] * run
        got = base[:9].clone()
        ops.apply(x[:9], got, a, b, scaling, LoraBatch.build(slots, 0, "cpu"), OFFSET)
        for t in range(9 - run, 9):
            assert torch.equal(got[t : t + 1], alone[t]), (run, t)


def test_slot_table_stores_b_transposed(families: dict[str, TinyFamily]) -> None:
    from engine.adapter_slots import AdapterSlots
    from engine.adapters import LoraAdapter, LoraModuleWeights

    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(families["llama"].base)))
    slots = AdapterSlots(arch, num_slots=3, max_rank=8, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(5)
    lora_b = torch.randn(arch.q_size, 4, generator=gen)
    weights = {(1, "q_proj"): LoraModuleWeights(torch.randn(4, arch.hidden_size, generator=gen), lora_b, 2.0)}
    slots.write(2, LoraAdapter("a", "memory", 4, ("q_proj",), weights, None))
    stack = slots.layers[1]["q_proj"]
    assert stack.lora_b.shape == (3, arch.q_size, 8) and stack.lora_b.stride(1) == 1
    assert torch.equal(stack.lora_b[2, :, :4], lora_b) and not stack.lora_b[2, :, 4:].any()
    assert not stack.lora_b[:2].any()


@needs_native
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_native_lora_keeps_a_poisoned_slot_to_its_own_rows(library: native_ops.Library, poison: float) -> None:
    x, base, a, b, scaling = _lora_case(torch.float32, seed=2)
    batch = LoraBatch.build(SLOTS, NUM_PREFILL, "cpu")
    ops = cpu_lora.NativeLoraOps(library)
    clean = base.clone()
    ops.apply(x, clean, a, b, scaling, batch, OFFSET)
    bad_a, bad_b = a.clone(), b.clone()
    bad_a[1].fill_(poison)
    bad_b[1].fill_(poison)
    dirty = base.clone()
    ops.apply(x, dirty, bad_a, bad_b, scaling, batch, OFFSET)
    others = [i for i, s in enumerate(SLOTS) if s != 1]
    assert torch.equal(dirty[others], clean[others])
    assert not torch.isfinite(dirty[[i for i, s in enumerate(SLOTS) if s == 1]]).all()


@needs_native
def test_native_lora_refuses_a_slot_outside_the_stack(library: native_ops.Library) -> None:
    x, base, a, b, scaling = _lora_case(torch.float32, seed=3)
    batch = LoraBatch.build([S, *SLOTS[1:]], NUM_PREFILL, "cpu")
    with pytest.raises(RuntimeError, match="token slot out of range"):
        cpu_lora.NativeLoraOps(library).apply(x, base, a, b, scaling, batch, OFFSET)


# ---- oneDNN linears ------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_equals_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(200, 96, generator=gen), torch.randn(200, generator=gen)
    x = torch.randn(rows, 96, generator=gen)
    got = cpu_linear.linear(x, cpu_linear.pack(weight), bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_packed_model_gives_the_same_logits(families: dict[str, TinyFamily]) -> None:
    from engine.model_loader import load_causal_lm

    fam = families["llama"]
    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(fam.base)))
    plain = load_causal_lm(fam.base, arch, torch.float32, "cpu")
    packed: CausalLM = load_causal_lm(fam.base, arch, torch.float32, "cpu")
    packed.pack_linears_for_cpu()
    assert packed.layers[0].qkv_proj.weight.is_meta  # the plain copy's memory is released
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    step = make_step(seed=9, num_kv_heads=arch.num_kv_heads, group=arch.num_heads // arch.num_kv_heads,
                     head_dim=arch.head_dim, decode_lens=[], prefills=[(0, 11)])
    ids = torch.randint(0, arch.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (plain, packed):
        kv = KVCache(arch.num_layers, step.kv.num_blocks, step.kv.block_size, arch.num_kv_heads, arch.head_dim,
                     torch.float32, "cpu")
        outs.append(model.logits(model(ids, step.torch_batch, kv, None)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


@needs_native
def test_native_pointwise_ops_give_the_same_logits(families: dict[str, TinyFamily], library: native_ops.Library) -> None:
    from engine.model_loader import load_causal_lm

    fam = families["qwen2"]  # q/k/v biases: the rotary op reads the biased projection
    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(str(fam.base)))
    model = load_causal_lm(fam.base, arch, torch.float32, "cpu")
    step = make_step(seed=9, num_kv_heads=arch.num_kv_heads, group=arch.num_heads // arch.num_kv_heads,
                     head_dim=arch.head_dim, decode_lens=[], prefills=[(0, 11)])
    ids = torch.randint(0, arch.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    outs = []
    for pointwise in (TORCH_POINTWISE, cpu_pointwise.NativePointwise(library)):
        model.pointwise = pointwise
        kv = KVCache(arch.num_layers, step.kv.num_blocks, step.kv.block_size, arch.num_kv_heads, arch.head_dim,
                     torch.float32, "cpu")
        outs.append(model.logits(model(ids, step.torch_batch, kv, None)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_linear_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.MODE_ENV, "torch")
    assert cpu_linear.use_onednn("cpu", torch.float32) is False
    monkeypatch.setenv(cpu_linear.MODE_ENV, "auto")
    assert cpu_linear.use_onednn("cpu", torch.bfloat16) is False  # F.linear already uses oneDNN there
    assert cpu_linear.use_onednn("meta", torch.float32) is False
    monkeypatch.setenv(cpu_linear.MODE_ENV, "mkl")
    with pytest.raises(ValueError, match=r"LORASERVE_CPU_LINEAR must be one of \('auto', 'onednn', 'torch'\)"):
        cpu_linear.mode()


# ---- the engine on the native path: tokens equal transformers + PEFT -----------------------------

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def oracles(families: dict[str, TinyFamily]) -> dict[str, PeftOracle]:
    return {name: PeftOracle(fam) for name, fam in families.items()}


def mixed_requests(fam: TinyFamily, n: int, seed: int) -> list[tuple[str, str | None]]:
    choices: list[str | None] = [None, *fam.adapters]
    adapters = [choices[i % len(choices)] for i in range(n)]
    random.Random(seed).shuffle(adapters)
    return list(zip(random_prompts(n, seed, 1, 40), adapters))


@needs_native
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_engine_native_mixed_batch_matches_peft(
    family: str, families: dict[str, TinyFamily], oracles: dict[str, PeftOracle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_attention.MODE_ENV, "native")
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, "native")
    fam, oracle = families[family], oracles[family]
    engine = make_engine(fam)
    try:
        assert engine.runner.native_attention and engine.runner.lora_ops.backend == "native"
        assert engine.runner.model.pointwise.backend == "native"
        assert engine.runner.onednn_linear == torch.backends.mkldnn.is_available()
        requests = mixed_requests(fam, 20, seed=len(family))
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS), f"{family}/{adapter}: {prompt!r}"
        assert engine.stats().max_batch_seqs >= 10
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


@needs_native
def test_engine_native_preemption_and_small_blocks_match_peft(
    families: dict[str, TinyFamily], oracles: dict[str, PeftOracle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_attention.MODE_ENV, "native")
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, "native")
    fam, oracle = families["llama"], oracles["llama"]
    engine = make_engine(fam, num_kv_blocks=20, block_size=8, max_num_batched_tokens=64)
    try:
        requests = mixed_requests(fam, 16, seed=11)
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS, stagger_s=0.005))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS)
        assert engine.stats().preemptions > 0
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """A tiny Mistral whose sliding window (8) is shorter than the prompts, with one adapter."""
    root: Path = tmp_path_factory.mktemp("windowed")
    base = build_model(root / "base", "mistral", seed=3, init_std=0.08)
    config_path = base / "config.json"
    config = json.loads(config_path.read_text())
    config["sliding_window"] = 8
    config_path.write_text(json.dumps(config))
    adapter = build_adapter(root / "qv", base, rank=8, alpha=16.0, targets=("q_proj", "v_proj"), seed=9, std=0.08)
    return TinyFamily("mistral", base, {"qv": adapter})


@pytest.mark.parametrize("path", [pytest.param("native", marks=needs_native), "torch"])
def test_engine_sliding_window_matches_transformers(
    path: str, windowed_mistral: TinyFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_attention.MODE_ENV, path)
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, path)
    oracle = PeftOracle(windowed_mistral)
    engine = make_engine(windowed_mistral)
    try:
        assert engine.arch.sliding_window == 8
        assert engine.runner.native_attention == (path == "native")
        assert engine.runner.model.pointwise.backend == path
        requests = [(p, a) for p, a in zip(random_prompts(8, 21, 12, 30), [None, "qv"] * 4)]
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS), f"{adapter}: {prompt!r}"
    finally:
        engine.shutdown()
