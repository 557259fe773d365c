"""Triton LoRA kernels against the plain-torch reference.

The same tests run at small shapes everywhere (without CUDA in Triton's interpreter) and, marked
`gpu`, at Mistral-7B-sized shapes on a GPU (`pytest -m gpu`, as vLLM's tests/lora/test_punica_ops.py).
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import pytest
import torch

from kernels import reference
from kernels.lora_ops import LoraBatch, LoraOps
from kernels.tuning import LoraTiling
from tests.kernel_helpers import (  # sets TRITON_INTERPRET (no GPU) before triton is imported
    COMPILE_OR_SKIP,
    DEVICE,
    DTYPES,
    compile_for_sm90,
    cuda_sync_trap,
    dtype_id,
    load_kernels,
    no_host_sync,
)
from tests.kernel_helpers import assert_close as _assert_close

triton = pytest.importorskip("triton")
tl_ops = load_kernels("kernels.triton_lora", "_bgmv_expand_kernel")

# (atol, rtol) against the reference evaluated in float32 on the same (already rounded) inputs, so
# the only error left is the kernel's accumulation order plus one final rounding to the dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
HIDDEN = [16, 64, 129, 257, 300, 512]
RANKS = [4, 8, 16, 20, 32, 64]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    _assert_close(actual, expected, dtype, TOLERANCES)


def _rand(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _strided_rows(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values as x, stored with padding between rows (a column slice of a wider tensor)."""
    pad = int(torch.randint(1, 5, (1,), generator=gen))
    wide = torch.zeros(x.shape[0], x.shape[1] + pad, dtype=x.dtype, device=x.device)
    wide[:, pad:] = x
    return wide[:, pad:]


def _out_buffer(
    rows: int, width: int, dtype: torch.dtype, gen: torch.Generator, column_major: bool
) -> torch.Tensor:
    base = _rand((rows, width), dtype, gen)
    if column_major:
        # Row stride 1, column stride `rows`: exercises the kernels' use of both strides.
        return base.t().contiguous().t()
    return base


def _lora_weights(
    slots: int, rank: int, in_f: int, out_f: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Scaled so that h and the delta are O(1): relative tolerances then mean what they say.
    lora_a = _rand((slots, rank, in_f), dtype, gen, scale=in_f**-0.5)
    lora_b = _rand((slots, out_f, rank), dtype, gen, scale=rank**-0.5)
    scaling = (torch.rand(slots, generator=gen) + 0.5).to(DEVICE)
    return lora_a, lora_b, scaling


def _random_segments(
    total: int, num_slots: int, rng: random.Random, max_len: int = 40
) -> tuple[list[int], list[int], list[int]]:
    """Segments over [0, total) with empty ones, slot -1 ones and rows covered by no segment."""
    starts: list[int] = []
    lens: list[int] = []
    slots: list[int] = []
    pos = 0
    while pos < total:
        if rng.random() < 0.15:
            pos += rng.randint(1, 3)  # a gap: rows no segment covers must come back as zero
            continue
        length = 0 if rng.random() < 0.2 else rng.randint(1, max(1, min(total - pos, max_len)))
        starts.append(pos)
        lens.append(length)
        slots.append(rng.randint(-1, num_slots - 1))
        pos += length
    if not starts or rng.random() < 0.3:
        starts.append(min(pos, total))
        lens.append(0)
        slots.append(rng.randint(0, num_slots - 1))
    return starts, lens, slots


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _cases(seed: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases: list[dict[str, Any]] = []
    for i in range(count):
        cases.append(
            {
                "tokens": [1, 2, 7, 33, 64][i % 5] if i < 5 else rng.randint(1, 64),
                "in_f": rng.choice(HIDDEN),
                "out_f": rng.choice(HIDDEN),
                "rank": RANKS[i % len(RANKS)],
                "slots": rng.randint(1, 5),
                "offset": rng.choice([0, 0, 3, 17]),
                "column_major": rng.random() < 0.3,
                "strided_x": rng.random() < 0.3,
                "seed": rng.randint(0, 2**31),
                "max_segment": 40,
            }
        )
    return cases


def _gpu_case(tokens: int, in_f: int, out_f: int, rank: int, slots: int, offset: int, **kw: Any) -> dict[str, Any]:
    case = dict(tokens=tokens, in_f=in_f, out_f=out_f, rank=rank, slots=slots, offset=offset,
                column_major=False, strided_x=False, seed=tokens * 31 + rank, max_segment=600)
    case.update(kw)
    return case


# Mistral-7B's projections (hidden 4096, MLP 14336, KV 1024) at decode and prefill batch sizes, 30
# adapters, ranks 8..128, a fused-output column offset, and the odd sizes again at scale.
GPU_CASES = [
    _gpu_case(1, 4096, 4096, 16, 4, 0),
    _gpu_case(64, 4096, 4096, 16, 64, 0),
    _gpu_case(64, 4096, 14336, 64, 8, 0, column_major=True),
    _gpu_case(256, 4096, 1024, 8, 30, 4096, strided_x=True),
    _gpu_case(37, 129, 257, 20, 5, 3),
    _gpu_case(64, 14336, 4096, 128, 4, 0),
    _gpu_case(1024, 4096, 4096, 16, 30, 0),
    _gpu_case(2048, 4096, 14336, 64, 8, 0),
]


def _case_id(case: dict[str, Any]) -> str:
    return f"T{case['tokens']}-in{case['in_f']}-out{case['out_f']}-r{case['rank']}"


CASES = _cases(seed=1234, count=6)
CASE_PARAMS = [pytest.param(c, id=_case_id(c)) for c in CASES] + [
    pytest.param(c, id="gpu-" + _case_id(c), marks=pytest.mark.gpu) for c in GPU_CASES
]


def _token_slots(case: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    slots = torch.randint(-1, case["slots"], (case["tokens"],), generator=gen)
    if case["tokens"] > 2:
        slots[0] = -1  # always at least one "no adapter" row
        slots[1] = 0
    return slots.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bgmv_shrink_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    x = _rand((case["tokens"], case["in_f"]), dtype, gen)
    if case["strided_x"]:
        x = _strided_rows(x, gen)
    lora_a, _, _ = _lora_weights(case["slots"], case["rank"], case["in_f"], 8, dtype, gen)
    token_slots = _token_slots(case, gen)

    got = tl_ops.bgmv_shrink(x, lora_a, token_slots)
    want = reference.bgmv_shrink(x.float(), lora_a.float(), token_slots)

    assert got.shape == (case["tokens"], case["rank"]) and got.dtype == dtype
    _close(got, want, dtype)
    assert torch.all(got[token_slots < 0] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bgmv_expand_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    tokens, out_f, off = case["tokens"], case["out_f"], case["offset"]
    _, lora_b, scaling = _lora_weights(case["slots"], case["rank"], 8, out_f, dtype, gen)
    h = _rand((tokens, case["rank"]), dtype, gen)
    token_slots = _token_slots(case, gen)
    out = _out_buffer(tokens, off + out_f + 5, dtype, gen, case["column_major"])
    before = out.clone()
    want = out.float()

    tl_ops.bgmv_expand(h, lora_b, token_slots, scaling, out, off)
    reference.bgmv_expand(h.float(), lora_b.float(), token_slots, scaling, want, off)

    _close(out, want, dtype)
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[token_slots >= 0, off : off + out_f] = False
    assert torch.equal(out[untouched], before[untouched]), "wrote outside the slice or into a -1 row"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_sgmv_shrink_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    tokens = case["tokens"]
    x = _rand((tokens, case["in_f"]), dtype, gen)
    if case["strided_x"]:
        x = _strided_rows(x, gen)
    lora_a, _, _ = _lora_weights(case["slots"], case["rank"], case["in_f"], 8, dtype, gen)
    starts, lens, slots = _random_segments(tokens, case["slots"], rng, case["max_segment"])

    got = tl_ops.sgmv_shrink(x, lora_a, _long(starts), _long(lens), _long(slots))
    want = reference.sgmv_shrink(x.float(), lora_a.float(), _long(starts), _long(lens), _long(slots))

    assert got.shape == (tokens, case["rank"]) and got.dtype == dtype
    _close(got, want, dtype)
    covered = torch.zeros(tokens, dtype=torch.bool, device=DEVICE)
    for start, length, slot in zip(starts, lens, slots):
        if slot >= 0:
            covered[start : start + length] = True
    assert torch.all(got[~covered] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_sgmv_expand_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    tokens, out_f, off = case["tokens"], case["out_f"], case["offset"]
    _, lora_b, scaling = _lora_weights(case["slots"], case["rank"], 8, out_f, dtype, gen)
    h = _rand((tokens, case["rank"]), dtype, gen)
    starts, lens, slots = _random_segments(tokens, case["slots"], rng, case["max_segment"])
    out = _out_buffer(tokens, off + out_f + 3, dtype, gen, case["column_major"])
    before = out.clone()
    want = out.float()
    seg = (_long(starts), _long(lens), _long(slots))

    tl_ops.sgmv_expand(h, lora_b, *seg, scaling, out, off)
    reference.sgmv_expand(h.float(), lora_b.float(), *seg, scaling, want, off)

    _close(out, want, dtype)
    assert torch.equal(out[:, :off], before[:, :off])
    assert torch.equal(out[:, off + out_f :], before[:, off + out_f :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_split_k_reduction_paths(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Force the split-`in` + reduce path (taken on GPUs for small batches) with an uneven split."""
    calls: list[int] = []
    real_pick = tl_ops._pick_split_k

    def forced(useful: int, k_blocks: int, device: torch.device, tiling: LoraTiling) -> int:
        real_pick(useful, k_blocks, device, tiling)
        calls.append(min(3, k_blocks))
        return min(3, k_blocks)

    monkeypatch.setattr(tl_ops, "_pick_split_k", forced)
    small_tiles = tl_ops.TritonLora(LoraTiling(tile_elems=512))  # several k-blocks at in=300
    gen = torch.Generator().manual_seed(7)
    tokens, in_f, rank = 9, 300, 16
    x = _rand((tokens, in_f), dtype, gen)
    lora_a, _, _ = _lora_weights(3, rank, in_f, 8, dtype, gen)
    token_slots = _long([0, -1, 2, 1, 1, -1, 0, 2, 2])
    seg = (_long([0, 2, 2, 7]), _long([2, 0, 5, 2]), _long([1, 0, 2, -1]))

    _close(
        small_tiles.bgmv_shrink(x, lora_a, token_slots),
        reference.bgmv_shrink(x.float(), lora_a.float(), token_slots),
        dtype,
    )
    _close(small_tiles.sgmv_shrink(x, lora_a, *seg), reference.sgmv_shrink(x.float(), lora_a.float(), *seg), dtype)
    assert calls and all(c > 1 for c in calls), "the split path was not exercised"


def test_rank_up_to_128_and_all_slots_empty() -> None:
    gen = torch.Generator().manual_seed(3)
    tokens, in_f, out_f, rank = 5, 40, 24, 128
    x = _rand((tokens, in_f), torch.float32, gen)
    lora_a, lora_b, scaling = _lora_weights(2, rank, in_f, out_f, torch.float32, gen)
    slots = _long([1, 0, -1, 1, 0])
    h = tl_ops.bgmv_shrink(x, lora_a, slots)
    _close(h, reference.bgmv_shrink(x, lora_a, slots), torch.float32)
    out, want = torch.zeros(tokens, out_f, device=DEVICE), torch.zeros(tokens, out_f, device=DEVICE)
    tl_ops.bgmv_expand(h, lora_b, slots, scaling, out)
    reference.bgmv_expand(h, lora_b, slots, scaling, want)
    _close(out, want, torch.float32)

    none = _long([-1] * tokens)
    assert torch.equal(tl_ops.bgmv_shrink(x, lora_a, none), torch.zeros(tokens, rank, device=DEVICE))
    seg = (_long([0, 3]), _long([3, 0]), _long([-1, 1]))
    assert torch.equal(tl_ops.sgmv_shrink(x, lora_a, *seg), torch.zeros(tokens, rank, device=DEVICE))
    before = out.clone()
    tl_ops.bgmv_expand(h, lora_b, none, scaling, out)
    tl_ops.sgmv_expand(h, lora_b, *seg, scaling, out)
    assert torch.equal(out, before)


def test_empty_inputs() -> None:
    x = torch.zeros(0, 32, device=DEVICE)
    lora_a = torch.zeros(2, 8, 32, device=DEVICE)
    lora_b = torch.zeros(2, 16, 8, device=DEVICE)
    empty = _long([])
    assert tl_ops.bgmv_shrink(x, lora_a, empty).shape == (0, 8)
    assert tl_ops.sgmv_shrink(x, lora_a, empty, empty, empty).shape == (0, 8)
    tl_ops.bgmv_expand(
        torch.zeros(0, 8, device=DEVICE),
        lora_b,
        empty,
        torch.ones(2, device=DEVICE),
        torch.zeros(0, 16, device=DEVICE),
    )
    x3 = torch.ones(3, 32, device=DEVICE)
    assert torch.equal(tl_ops.sgmv_shrink(x3, lora_a, empty, empty, empty), torch.zeros(3, 8, device=DEVICE))


def test_mismatched_shapes_raise_instead_of_writing_out_of_bounds() -> None:
    x = torch.zeros(4, 32, device=DEVICE)
    lora_a = torch.zeros(2, 8, 32, device=DEVICE)
    lora_b = torch.zeros(2, 16, 8, device=DEVICE)
    h, scaling, slots = torch.zeros(4, 8, device=DEVICE), torch.ones(2, device=DEVICE), _long([0, 1, 0, 1])
    seg = (_long([0]), _long([4]), _long([1]))
    with pytest.raises(ValueError, match="columns"):
        tl_ops.bgmv_expand(h, lora_b, slots, scaling, torch.zeros(4, 20, device=DEVICE), 10)
    with pytest.raises(ValueError, match="columns"):
        tl_ops.sgmv_expand(h, lora_b, *seg, scaling, torch.zeros(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="entries"):
        tl_ops.bgmv_shrink(x, lora_a, slots[:3])
    with pytest.raises(ValueError, match="columns"):
        tl_ops.sgmv_shrink(x[:, :31], lora_a, *seg)


def test_signatures_match_reference() -> None:
    for name in ("bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand"):
        ours = inspect.signature(getattr(tl_ops, name))
        theirs = inspect.signature(getattr(reference, name))
        assert list(ours.parameters.items()) == list(theirs.parameters.items()), name


def test_ops_do_not_sync_with_the_host() -> None:
    gen = torch.Generator().manual_seed(11)
    x = _rand((6, 48), torch.float16, gen)
    lora_a, lora_b, scaling = _lora_weights(3, 8, 48, 40, torch.float16, gen)
    slots = _long([0, 2, -1, 1, 1, 0])
    seg = (_long([0, 2]), _long([2, 4]), _long([2, 1]))
    out = torch.zeros(6, 50, dtype=torch.float16, device=DEVICE)
    with no_host_sync("a LoRA op"):
        h = tl_ops.bgmv_shrink(x, lora_a, slots)
        tl_ops.bgmv_expand(h, lora_b, slots, scaling, out, 5)
        h = tl_ops.sgmv_shrink(x, lora_a, *seg)
        tl_ops.sgmv_expand(h, lora_b, *seg, scaling, out, 5)
    assert out[:, 5:45].abs().sum() > 0


# A mixed step: (slot, length) of each prefill sequence, then one slot per decode row.
MIXED_BATCHES = [
    pytest.param(
        dict(hidden=129, widths=[129, 33, 33], slots=4, max_rank=16,
             prefill=[(0, 9), (2, 1), (-1, 5), (1, 12), (2, 3)], decode=[1, -1, 0, 3, 3, 2, -1, 0]),
        id="small",
    ),
    pytest.param(
        dict(hidden=4096, widths=[4096, 1024, 1024], slots=30, max_rank=16,
             prefill=[(0, 450), (7, 1), (-1, 300), (29, 77), (3, 12)],
             decode=[random.Random(5).randint(-1, 29) for _ in range(128)]),
        id="gpu-mistral7b-qkv",
        marks=pytest.mark.gpu,
    ),
]


def _mixed_batch_inputs(shape: dict[str, Any], dtype: torch.dtype) -> tuple[LoraBatch, torch.Tensor, torch.Tensor]:
    token_slots = [slot for slot, length in shape["prefill"] for _ in range(length)] + shape["decode"]
    num_prefill = sum(length for _, length in shape["prefill"])
    gen = torch.Generator().manual_seed(21)
    x = _rand((len(token_slots), shape["hidden"]), dtype, gen)
    base = _rand((len(token_slots), sum(shape["widths"])), dtype, gen)
    return LoraBatch.build(token_slots, num_prefill, DEVICE), x, base


def _fused_lora_weights(
    shape: dict[str, Any], dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, scaling) per column slice of a fused output; each slot's real rank zero-padded to max_rank."""
    gen = torch.Generator().manual_seed(22)
    rng = random.Random(21)
    weights = []
    for width in shape["widths"]:
        lora_a, lora_b, scaling = _lora_weights(shape["slots"], shape["max_rank"], shape["hidden"], width, dtype, gen)
        for slot in range(shape["slots"]):
            rank = rng.choice([4, 8, 16])
            lora_a[slot, rank:] = 0
            lora_b[slot, :, rank:] = 0
        weights.append((lora_a, lora_b, scaling))
    return weights


def _apply_fused(ops: LoraOps, x: torch.Tensor, out: torch.Tensor, weights: list[Any], batch: LoraBatch) -> None:
    offset = 0
    for lora_a, lora_b, scaling in weights:
        ops.apply(x, out, lora_a, lora_b, scaling, batch, offset)
        offset += lora_b.shape[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", MIXED_BATCHES)
def test_lora_ops_triton_matches_torch_on_mixed_batch(shape: dict[str, Any], dtype: torch.dtype) -> None:
    """Prefill segments + decode rows, fused-qkv style output slices, mixed ranks padded to R."""
    batch_t, x, base = _mixed_batch_inputs(shape, dtype)
    weights = _fused_lora_weights(shape, dtype)
    got, want = base.clone(), base.clone()
    triton_ops, torch_ops = LoraOps("triton"), LoraOps("torch")
    _apply_fused(triton_ops, x, got, weights, batch_t)
    _apply_fused(torch_ops, x, want, weights, batch_t)

    assert triton_ops.impl_for(x) is tl_ops
    assert LoraOps("auto").impl_for(x) is (tl_ops if DEVICE.type == "cuda" else reference)
    # Both sides round h to the dtype, so allow two roundings' worth.
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)
    no_adapter = batch_t.token_slots < 0
    assert torch.equal(got[no_adapter], base[no_adapter])
    assert not torch.equal(got[~no_adapter], base[~no_adapter])


@pytest.mark.gpu
def test_mixed_batch_on_cuda_never_syncs_with_the_host() -> None:
    """torch's own sync detector, on the real device, after the JIT has compiled (compiling may sync)."""
    shape = MIXED_BATCHES[1].values[0]
    batch_t, x, base = _mixed_batch_inputs(shape, torch.bfloat16)
    weights = _fused_lora_weights(shape, torch.bfloat16)
    ops = LoraOps("auto")
    _apply_fused(ops, x, base.clone(), weights, batch_t)
    out = base.clone()
    with cuda_sync_trap():
        _apply_fused(ops, x, out, weights, batch_t)
    assert not torch.equal(out, base)


# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set, this process's kernels are interpreter
# objects that the compiler cannot take.
_COMPILE_SCRIPT = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_lora as k

INDEX_POINTERS = {"slots_ptr", "starts_ptr", "lens_ptr"}
""" + COMPILE_OR_SKIP + r"""
done = 0
for dtype in ("fp16", "fp32"):  # bf16 lowers like fp16; the GPU check covers it for real
    prec = "ieee" if dtype == "fp32" else "tf32"
    data = "*" + dtype
    dot = {"DOT_PRECISION": prec, "UPCAST_DOT": False}
    jobs = [
        (k._bgmv_shrink_kernel, {"x_ptr": data, "a_ptr": data, "out_ptr": "*fp32"}, {"BLOCK_R": 4, "BLOCK_K": 1024}, 4),
        (k._bgmv_shrink_kernel, {"x_ptr": data, "a_ptr": data, "out_ptr": data}, {"BLOCK_R": 64, "BLOCK_K": 64}, 4),
        (k._reduce_splits_kernel, {"part_ptr": "*fp32", "out_ptr": data}, {"BLOCK_T": 256, "BLOCK_R": 16}, 4),
        (k._bgmv_expand_kernel, {"h_ptr": data, "b_ptr": data, "out_ptr": data}, {"BLOCK_N": 256, "BLOCK_R": 16}, 4),
        (k._sgmv_shrink_kernel, {"x_ptr": data, "a_ptr": data, "out_ptr": data},
         {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_R": 16, **dot}, 4),
        (k._sgmv_expand_kernel, {"h_ptr": data, "b_ptr": data, "out_ptr": data},
         {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 16, **dot}, 8),
    ]
    for fn, pointers, constexprs, warps in jobs:
        signature = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, "*i64" if name in INDEX_POINTERS else "*fp32")
            else:
                signature[name] = "i32"
        compiled = compile_or_skip(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            GPUTarget("cuda", 90, 32),
            {"num_warps": warps, "num_stages": 3},
        )
        assert compiled.asm.get("cubin"), fn
        done += 1
print("compiled", done)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects, so compile every kernel for H100 (no GPU needed)."""
    compile_for_sm90(_COMPILE_SCRIPT, "compiled 12", timeout_s=300)
