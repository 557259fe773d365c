"""Triton LoRA kernels against the plain-torch reference.

Without CUDA the kernels run under Triton's interpreter; the variable must be set before the first
`@triton.jit` decoration, i.e. before `kernels.triton_lora` is imported anywhere in the session.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import inspect
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.lora_ops import LoraBatch, LoraOps  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton_lora() -> Any:
    module = importlib.import_module("kernels.triton_lora")
    # If another test module imported it before the interpreter flag was set, the kernels were
    # decorated for a GPU that is not there; re-decorating them is all that is needed.
    if INTERPRETED and type(module._bgmv_expand_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


tl_ops = _load_triton_lora()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) against the reference evaluated in float32 on the same (already rounded) inputs, so
# the only error left is the kernel's accumulation order plus one final rounding to the dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
HIDDEN = [16, 64, 129, 257, 300, 512]
RANKS = [4, 8, 16, 20, 32, 64]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


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
    total: int, num_slots: int, rng: random.Random
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
        length = 0 if rng.random() < 0.2 else rng.randint(1, max(1, min(total - pos, 40)))
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
            }
        )
    return cases


CASES = _cases(seed=1234, count=6)
CASE_IDS = [f"T{c['tokens']}-in{c['in_f']}-out{c['out_f']}-r{c['rank']}" for c in CASES]


def _token_slots(case: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    slots = torch.randint(-1, case["slots"], (case["tokens"],), generator=gen)
    if case["tokens"] > 2:
        slots[0] = -1  # always at least one "no adapter" row
        slots[1] = 0
    return slots.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sgmv_shrink_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    tokens = case["tokens"]
    x = _rand((tokens, case["in_f"]), dtype, gen)
    if case["strided_x"]:
        x = _strided_rows(x, gen)
    lora_a, _, _ = _lora_weights(case["slots"], case["rank"], case["in_f"], 8, dtype, gen)
    starts, lens, slots = _random_segments(tokens, case["slots"], rng)

    got = tl_ops.sgmv_shrink(x, lora_a, _long(starts), _long(lens), _long(slots))
    want = reference.sgmv_shrink(x.float(), lora_a.float(), _long(starts), _long(lens), _long(slots))

    assert got.shape == (tokens, case["rank"]) and got.dtype == dtype
    _close(got, want, dtype)
    covered = torch.zeros(tokens, dtype=torch.bool, device=DEVICE)
    for start, length, slot in zip(starts, lens, slots):
        if slot >= 0:
            covered[start : start + length] = True
    assert torch.all(got[~covered] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sgmv_expand_matches_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    tokens, out_f, off = case["tokens"], case["out_f"], case["offset"]
    _, lora_b, scaling = _lora_weights(case["slots"], case["rank"], 8, out_f, dtype, gen)
    h = _rand((tokens, case["rank"]), dtype, gen)
    starts, lens, slots = _random_segments(tokens, case["slots"], rng)
    out = _out_buffer(tokens, off + out_f + 3, dtype, gen, case["column_major"])
    before = out.clone()
    want = out.float()
    seg = (_long(starts), _long(lens), _long(slots))

    tl_ops.sgmv_expand(h, lora_b, *seg, scaling, out, off)
    reference.sgmv_expand(h.float(), lora_b.float(), *seg, scaling, want, off)

    _close(out, want, dtype)
    assert torch.equal(out[:, :off], before[:, :off])
    assert torch.equal(out[:, off + out_f :], before[:, off + out_f :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_split_k_reduction_paths(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Force the split-`in` + reduce path (taken on GPUs for small batches) with an uneven split."""
    calls: list[int] = []
    real_pick = tl_ops._pick_split_k

    def forced(useful: int, k_blocks: int, device: torch.device) -> int:
        real_pick(useful, k_blocks, device)
        calls.append(min(3, k_blocks))
        return min(3, k_blocks)

    monkeypatch.setattr(tl_ops, "_TILE_ELEMS", 512)  # small tiles: several k-blocks at in=300
    monkeypatch.setattr(tl_ops, "_pick_split_k", forced)
    gen = torch.Generator().manual_seed(7)
    tokens, in_f, rank = 9, 300, 16
    x = _rand((tokens, in_f), dtype, gen)
    lora_a, _, _ = _lora_weights(3, rank, in_f, 8, dtype, gen)
    token_slots = _long([0, -1, 2, 1, 1, -1, 0, 2, 2])
    seg = (_long([0, 2, 2, 7]), _long([2, 0, 5, 2]), _long([1, 0, 2, -1]))

    _close(
        tl_ops.bgmv_shrink(x, lora_a, token_slots),
        reference.bgmv_shrink(x.float(), lora_a.float(), token_slots),
        dtype,
    )
    _close(tl_ops.sgmv_shrink(x, lora_a, *seg), reference.sgmv_shrink(x.float(), lora_a.float(), *seg), dtype)
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


@contextmanager
def _no_host_sync() -> Iterator[list[str]]:
    """Make every Tensor -> Python value conversion raise: on CUDA each would stall the step."""
    names = ["item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name: str) -> Callable[..., Any]:
        def raiser(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host sync: Tensor.{name}() inside a LoRA op")

        return raiser

    for name in names:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield names
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_ops_do_not_sync_with_the_host() -> None:
    gen = torch.Generator().manual_seed(11)
    x = _rand((6, 48), torch.float16, gen)
    lora_a, lora_b, scaling = _lora_weights(3, 8, 48, 40, torch.float16, gen)
    slots = _long([0, 2, -1, 1, 1, 0])
    seg = (_long([0, 2]), _long([2, 4]), _long([2, 1]))
    out = torch.zeros(6, 50, dtype=torch.float16, device=DEVICE)
    with _no_host_sync():
        h = tl_ops.bgmv_shrink(x, lora_a, slots)
        tl_ops.bgmv_expand(h, lora_b, slots, scaling, out, 5)
        h = tl_ops.sgmv_shrink(x, lora_a, *seg)
        tl_ops.sgmv_expand(h, lora_b, *seg, scaling, out, 5)
    assert out[:, 5:45].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_lora_ops_triton_matches_torch_on_mixed_batch(dtype: torch.dtype) -> None:
    """Prefill segments + decode rows, fused-qkv style output slices, mixed ranks padded to R."""
    gen = torch.Generator().manual_seed(21)
    rng = random.Random(21)
    hidden, slots_n, max_rank = 129, 4, 16
    widths = [129, 33, 33]  # q, k, v columns of one fused output
    prefill = [(0, 9), (2, 1), (-1, 5), (1, 12), (2, 3)]  # (slot, length) per sequence
    decode = [1, -1, 0, 3, 3, 2, -1, 0]
    token_slots = [slot for slot, length in prefill for _ in range(length)] + decode
    num_prefill = sum(length for _, length in prefill)
    batch_t = LoraBatch.build(token_slots, num_prefill, DEVICE)
    tokens = len(token_slots)

    x = _rand((tokens, hidden), dtype, gen)
    base = _rand((tokens, sum(widths)), dtype, gen)
    got, want = base.clone(), base.clone()
    triton_ops, torch_ops = LoraOps("triton"), LoraOps("torch")
    offset = 0
    for width in widths:
        lora_a, lora_b, scaling = _lora_weights(slots_n, max_rank, hidden, width, dtype, gen)
        for slot in range(slots_n):  # each slot's real rank, zero-padded up to max_rank
            rank = rng.choice([4, 8, 16])
            lora_a[slot, rank:] = 0
            lora_b[slot, :, rank:] = 0
        triton_ops.apply(x, got, lora_a, lora_b, scaling, batch_t, offset)
        torch_ops.apply(x, want, lora_a, lora_b, scaling, batch_t, offset)
        offset += width

    assert triton_ops.impl_for(x) is tl_ops
    # Both sides round h to the dtype, so allow two roundings' worth.
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)
    no_adapter = _long(token_slots) < 0
    assert torch.equal(got[no_adapter], base[no_adapter])
    assert not torch.equal(got[~no_adapter], base[~no_adapter])


# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set, this process's kernels are interpreter
# objects that the compiler cannot take.
_COMPILE_SCRIPT = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_lora as k

INDEX_POINTERS = {"slots_ptr", "starts_ptr", "lens_ptr"}
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
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": warps, "num_stages": 3},
            )
        except Exception as exc:
            if "ptxas" in str(exc) and isinstance(exc, (FileNotFoundError, RuntimeError)):
                print("no ptxas:", exc)
                sys.exit(77)
            raise
        assert compiled.asm.get("cubin"), fn
        done += 1
print("compiled", done)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects, so compile every kernel for H100 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled 12" in proc.stdout
