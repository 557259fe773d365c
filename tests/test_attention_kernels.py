"""Triton paged attention against the plain-torch reference, and the reference against the engine.

Without CUDA the kernels run under Triton's interpreter; the variable must be set before the first
`@triton.jit` decoration, i.e. before `kernels.triton_attention` is imported anywhere in the session.
Every cache built here holds NaN in each slot no row may read (the tails of last blocks, spare blocks,
blocks that unused table entries point to), so isolation is checked by every comparison.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from engine.attention import AttentionBatch, DecodeGroup, KVCache, PrefillSpan, padded_kv_slots
from engine.attention import paged_attention as engine_paged_attention
from kernels import attention_reference as reference
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

tl_attn = load_kernels("kernels.triton_attention", "_paged_decode_kernel")

# (atol, rtol) against the reference on the same (already rounded) inputs: what is left is the order
# of accumulation, the probabilities rounded to the dtype for the P @ V dot, and one final rounding.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
WINDOWS = [None, 5, 1000]  # none, shorter than most contexts, longer than every context


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    _assert_close(actual, expected, dtype, TOLERANCES)


@dataclass(frozen=True)
class PagedCache:
    k_cache: torch.Tensor  # [slots, Hkv, D], NaN in every slot no sequence owns below its context
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [rows, width] int32
    context_lens: torch.Tensor  # [rows] int32
    block_size: int


def _paged_cache(
    context_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    unused_fill: float = float("nan"),
) -> PagedCache:
    """Blocks scattered in a random order over a cache with spare blocks; unread slots hold `unused_fill`.

    Unused table entries are -1 in even rows and point at a spare block in odd rows (the contract
    is that entries past a context are never read, whatever they hold).
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for ctx in context_lens]
    spare = 3
    num_blocks = sum(needed) + spare
    order = list(range(num_blocks))
    rng.shuffle(order)
    spare_blocks, order = order[:spare], order[spare:]
    width = max(needed, default=0) + 2
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    readable = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for row, (ctx, count) in enumerate(zip(context_lens, needed, strict=True)):
        owned, order = order[:count], order[count:]
        tables[row, :count] = torch.tensor(owned, dtype=torch.int32)
        if row % 2 == 1:
            tables[row, count:] = rng.choice(spare_blocks)
        for pos in range(ctx):
            readable[owned[pos // block_size] * block_size + pos % block_size] = True
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    k_cache[~readable] = unused_fill
    v_cache[~readable] = unused_fill
    return PagedCache(
        k_cache=k_cache.to(device=DEVICE, dtype=dtype),
        v_cache=v_cache.to(device=DEVICE, dtype=dtype),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        block_size=block_size,
    )


def _queries(rows: int, num_heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(rows, num_heads, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)


def _query_start(chunk_lens: list[int]) -> torch.Tensor:
    starts = [0]
    for length in chunk_lens:
        starts.append(starts[-1] + length)
    return torch.tensor(starts, dtype=torch.int32, device=DEVICE)


def _decode(impl: Any, q: torch.Tensor, cache: PagedCache, window: int | None, **kw: Any) -> torch.Tensor:
    return impl.paged_decode_attention(
        q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens, cache.block_size,
        q.shape[-1] ** -0.5, window, **kw,
    )


def _prefill(
    impl: Any, q: torch.Tensor, cache: PagedCache, chunk_lens: list[int], window: int | None, **kw: Any
) -> torch.Tensor:
    return impl.paged_prefill_attention(
        q, cache.k_cache, cache.v_cache, cache.block_tables, _query_start(chunk_lens), cache.context_lens,
        cache.block_size, q.shape[-1] ** -0.5, window, **kw,
    )


def _boundary_contexts(block_size: int) -> list[int]:
    # Odd lengths, exact block multiples and one past them, one token, and a long one.
    return [1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1, 37, 70]


# --------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference(block_size: int, group: int, window: int | None) -> None:
    num_kv_heads, head_dim = 2, 16
    contexts = _boundary_contexts(block_size)
    cache = _paged_cache(contexts, block_size, num_kv_heads, head_dim, torch.float32, seed=block_size + group)
    q = _queries(len(contexts), num_kv_heads * group, head_dim, torch.float32, seed=group)
    want = _decode(reference, q, cache, window)
    got = _decode(tl_attn, q, cache, window)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    _close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_dtypes(dtype: torch.dtype, window: int | None) -> None:
    block_size, num_kv_heads, group, head_dim = 16, 2, 2, 32
    contexts = [3, 16, 17, 70, 33]
    cache = _paged_cache(contexts, block_size, num_kv_heads, head_dim, dtype, seed=7)
    q = _queries(len(contexts), num_kv_heads * group, head_dim, dtype, seed=7)
    got = _decode(tl_attn, q, cache, window)
    assert got.dtype == dtype
    _close(got, _decode(reference, q, cache, window), dtype)


def test_decode_head_dim_not_a_power_of_two_and_many_heads_per_group() -> None:
    contexts = [5, 12, 29]
    cache = _paged_cache(contexts, 4, 1, 24, torch.float32, seed=3)
    q = _queries(len(contexts), 6, 24, torch.float32, seed=3)  # 6 query heads on 1 KV head
    _close(_decode(tl_attn, q, cache, 9), _decode(reference, q, cache, 9), torch.float32)


def test_decode_window_of_one_is_the_last_value() -> None:
    contexts = [1, 9, 20]
    cache = _paged_cache(contexts, 4, 2, 16, torch.float32, seed=5)
    q = _queries(len(contexts), 4, 16, torch.float32, seed=5)
    got = _decode(tl_attn, q, cache, 1)
    for row, ctx in enumerate(contexts):
        block = int(cache.block_tables[row, (ctx - 1) // 4])
        last = cache.v_cache[block * 4 + (ctx - 1) % 4]  # [Hkv, D]
        torch.testing.assert_close(got[row], last.repeat_interleave(2, dim=0), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# prefill


def _prefill_case(block_size: int) -> tuple[list[int], list[int]]:
    """(chunk lengths, context lengths): whole prompts, chunks after a cached prefix, empty chunks."""
    chunks = [1, 7, block_size, 0, 5, block_size + 1, 3, 20]
    prefixes = [0, 0, block_size, 9, 2 * block_size - 5, 0, 2 * block_size, 50]
    return chunks, [c + p for c, p in zip(chunks, prefixes, strict=True)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_matches_reference(block_size: int, group: int, window: int | None) -> None:
    num_kv_heads, head_dim = 2, 16
    chunks, contexts = _prefill_case(block_size)
    cache = _paged_cache(contexts, block_size, num_kv_heads, head_dim, torch.float32, seed=block_size * group)
    q = _queries(sum(chunks), num_kv_heads * group, head_dim, torch.float32, seed=group)
    want = _prefill(reference, q, cache, chunks, window)
    got = _prefill(tl_attn, q, cache, chunks, window)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    _close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_dtypes(dtype: torch.dtype, window: int | None) -> None:
    chunks, contexts = [9, 30, 1, 16], [9, 47, 64, 33]
    cache = _paged_cache(contexts, 16, 2, 32, dtype, seed=11)
    q = _queries(sum(chunks), 4, 32, dtype, seed=11)
    got = _prefill(tl_attn, q, cache, chunks, window)
    assert got.dtype == dtype
    _close(got, _prefill(reference, q, cache, chunks, window), dtype)


def test_prefill_single_long_chunk_spans_many_query_tiles() -> None:
    # 70 tokens x 3 heads per group is several query tiles of one sequence, each with its own key range.
    cache = _paged_cache([70], 4, 1, 16, torch.float32, seed=13)
    q = _queries(70, 3, 16, torch.float32, seed=13)
    for window in (None, 7):
        _close(_prefill(tl_attn, q, cache, [70], window), _prefill(reference, q, cache, [70], window), torch.float32)


def test_prefill_of_one_token_equals_decode() -> None:
    contexts = [1, 8, 9, 23]
    cache = _paged_cache(contexts, 4, 2, 16, torch.float32, seed=17)
    q = _queries(len(contexts), 4, 16, torch.float32, seed=17)
    for impl in (reference, tl_attn):
        decode = _decode(impl, q, cache, 6)
        prefill = _prefill(impl, q, cache, [1] * len(contexts), 6)
        torch.testing.assert_close(prefill, decode, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# isolation, empty inputs, strides, argument checks


@pytest.mark.parametrize("impl", [reference, tl_attn], ids=["reference", "triton"])
def test_unread_slots_contribute_exactly_nothing(impl: Any) -> None:
    """Bit-identical output whether the slots a row may not read hold NaN, Inf or zeros."""
    chunks, contexts = _prefill_case(4)
    outputs = []
    for fill in (float("nan"), float("inf"), 0.0):
        cache = _paged_cache(contexts, 4, 2, 16, torch.float32, seed=19, unused_fill=fill)
        q = _queries(sum(chunks), 4, 16, torch.float32, seed=19)
        dec = _decode(impl, q[: len(contexts)], cache, None)
        pre = _prefill(impl, q, cache, chunks, 5)
        outputs.append((dec, pre))
    for dec, pre in outputs[1:]:
        assert torch.equal(dec, outputs[0][0])
        assert torch.equal(pre, outputs[0][1])
    assert torch.isfinite(outputs[0][0]).all() and torch.isfinite(outputs[0][1]).all()


@pytest.mark.parametrize("impl", [reference, tl_attn], ids=["reference", "triton"])
def test_context_of_zero_gives_zeros(impl: Any) -> None:
    cache = _paged_cache([0, 6], 4, 1, 16, torch.float32, seed=23)
    q = _queries(2, 2, 16, torch.float32, seed=23)
    out = _decode(impl, q, cache, None)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out[1]).all() and out[1].abs().sum() > 0


class _NoLaunch:
    def __getitem__(self, grid: Any) -> Callable[..., None]:
        raise AssertionError(f"kernel launched with grid {grid} for an empty batch")


def test_empty_batches_return_empty_without_launching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tl_attn, "_paged_decode_kernel", _NoLaunch())
    monkeypatch.setattr(tl_attn, "_paged_prefill_kernel", _NoLaunch())
    cache = _paged_cache([5], 4, 2, 16, torch.float32, seed=29)
    none = _paged_cache([], 4, 2, 16, torch.float32, seed=29)
    for impl in (reference, tl_attn):
        out = _decode(impl, _queries(0, 4, 16, torch.float32, seed=1), none, None)
        assert out.shape == (0, 4, 16)
        out = _prefill(impl, _queries(0, 4, 16, torch.float32, seed=1), none, [], None)
        assert out.shape == (0, 4, 16)
        # N = 1 sequence whose chunk is empty: T = 0 rows, nothing to attend.
        out = _prefill(impl, _queries(0, 4, 16, torch.float32, seed=1), cache, [0], None)
        assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("impl", [reference, tl_attn], ids=["reference", "triton"])
def test_strided_query_and_out_views(impl: Any) -> None:
    """q as the query columns of a fused qkv output, out as a padded buffer: written in place."""
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    chunks, contexts = [3, 6], [3, 14]
    cache = _paged_cache(contexts, 4, num_kv_heads, head_dim, torch.float32, seed=31)
    q = _queries(sum(chunks), num_heads, head_dim, torch.float32, seed=31)
    qkv = torch.zeros(q.shape[0], (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    qkv[:, : num_heads * head_dim] = q.reshape(q.shape[0], -1)
    q_view = qkv[:, : num_heads * head_dim].view(q.shape[0], num_heads, head_dim)
    assert not q_view.is_contiguous()
    padded = torch.full((q.shape[0], num_heads, head_dim + 3), 7.0, device=DEVICE)
    out = padded[:, :, :head_dim]
    returned = _prefill(impl, q_view, cache, chunks, None, out=out)
    assert returned.data_ptr() == out.data_ptr()
    _close(out, _prefill(reference, q, cache, chunks, None), torch.float32)
    assert torch.equal(padded[:, :, head_dim:], torch.full_like(padded[:, :, head_dim:], 7.0))
    dec_out = padded[: len(contexts), :, :head_dim]
    _decode(impl, q_view[: len(contexts)], cache, None, out=dec_out)
    _close(dec_out, _decode(reference, q[: len(contexts)], cache, None), torch.float32)


@pytest.mark.parametrize("impl", [reference, tl_attn], ids=["reference", "triton"])
def test_int64_index_tensors(impl: Any) -> None:
    cache = _paged_cache([5, 13], 4, 2, 16, torch.float32, seed=37)
    wide = PagedCache(
        cache.k_cache, cache.v_cache, cache.block_tables.long(), cache.context_lens.long(), cache.block_size
    )
    q = _queries(2, 4, 16, torch.float32, seed=37)
    _close(_decode(impl, q, wide, 3), _decode(reference, q, cache, 3), torch.float32)


@pytest.mark.parametrize("impl", [reference, tl_attn], ids=["reference", "triton"])
def test_bad_shapes_raise_before_any_read(impl: Any) -> None:
    cache = _paged_cache([5, 9], 4, 2, 16, torch.float32, seed=41)
    q = _queries(2, 4, 16, torch.float32, seed=41)
    args = (cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens, 4, 0.25)
    with pytest.raises(ValueError, match="multiple"):
        impl.paged_decode_attention(_queries(2, 3, 16, torch.float32, seed=1), *args)
    with pytest.raises(ValueError, match="head_dim"):
        impl.paged_decode_attention(_queries(2, 4, 8, torch.float32, seed=1), *args)
    with pytest.raises(ValueError, match="context_lens"):
        impl.paged_decode_attention(q[:1], *args)
    with pytest.raises(ValueError, match="dtypes"):
        impl.paged_decode_attention(q.half(), *args)
    with pytest.raises(ValueError, match="block_size"):
        impl.paged_decode_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens, 3, 0.25)
    with pytest.raises(ValueError, match="sliding_window"):
        impl.paged_decode_attention(q, *args, 0)
    with pytest.raises(ValueError, match="out"):
        impl.paged_decode_attention(q, *args, None, torch.empty(2, 4, 17, device=DEVICE))
    with pytest.raises(ValueError, match="int32 or int64"):
        impl.paged_decode_attention(q, cache.k_cache, cache.v_cache, cache.block_tables.float(),
                                    cache.context_lens, 4, 0.25)
    with pytest.raises(ValueError, match="query_start"):
        impl.paged_prefill_attention(
            q, cache.k_cache, cache.v_cache, cache.block_tables, _query_start([2]), cache.context_lens, 4, 0.25
        )


def test_reference_rejects_contexts_its_tables_cannot_hold() -> None:
    cache = _paged_cache([5, 9], 4, 2, 16, torch.float32, seed=43)
    q = _queries(2, 4, 16, torch.float32, seed=43)
    capacity = cache.block_tables.shape[1] * 4
    too_long = torch.tensor([5, capacity + 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="context_lens"):
        reference.paged_decode_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, too_long, 4, 0.25)
    with pytest.raises(ValueError, match="query rows"):  # a chunk longer than its whole context
        _prefill(reference, _queries(7, 4, 16, torch.float32, seed=1), cache, [6, 1], None)
    bad_starts = torch.tensor([0, 3, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="rise"):
        reference.paged_prefill_attention(
            q, cache.k_cache, cache.v_cache, cache.block_tables, bad_starts, cache.context_lens, 4, 0.25
        )


def test_signatures_match_reference() -> None:
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        ours = inspect.signature(getattr(tl_attn, name))
        theirs = inspect.signature(getattr(reference, name))
        assert list(ours.parameters.items()) == list(theirs.parameters.items()), name


def test_triton_launches_do_not_sync_with_the_host() -> None:
    chunks, contexts = [4, 9], [4, 21]
    cache = _paged_cache(contexts, 4, 2, 16, torch.float16, seed=47)
    q = _queries(sum(chunks), 4, 16, torch.float16, seed=47)
    query_start = _query_start(chunks)
    with no_host_sync("a paged attention launch"):
        dec = _decode(tl_attn, q[:2], cache, 8)
        pre = tl_attn.paged_prefill_attention(
            q, cache.k_cache, cache.v_cache, cache.block_tables, query_start, cache.context_lens, 4, 0.25, 8
        )
    assert torch.isfinite(dec).all() and torch.isfinite(pre).all()


# --------------------------------------------------------------------------------------------------
# the reference against the engine's attention (the torch path of engine.attention)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_agrees_with_engine_paged_attention(window: int | None) -> None:
    """One mixed step: prefill chunks (one after a cached prefix) then decode rows, GQA 2, float32."""
    block_size, num_kv_heads, num_heads, head_dim = 4, 2, 4, 16
    chunks, prefill_ctx = [5, 6], [5, 19]
    decode_ctx = [1, 8, 9, 30]
    contexts = prefill_ctx + decode_ctx
    cache = _paged_cache(contexts, block_size, num_kv_heads, head_dim, torch.float32, seed=53)
    num_prefill = sum(chunks)
    q = _queries(num_prefill + len(decode_ctx), num_heads, head_dim, torch.float32, seed=53)

    tables = [row[: -(-ctx // block_size)] for row, ctx in zip(cache.block_tables.tolist(), contexts, strict=True)]
    kv = KVCache(1, cache.k_cache.shape[0] // block_size, block_size, num_kv_heads, head_dim, torch.float32, DEVICE)
    kv.k[0].copy_(cache.k_cache)
    kv.v[0].copy_(cache.v_cache)
    # This step's new tokens: the last `chunk` positions of each prefill, the last position of each decode.
    new_positions = [(i, p) for i, (c, ctx) in enumerate(zip(chunks, prefill_ctx, strict=True))
                     for p in range(ctx - c, ctx)]
    new_positions += [(len(chunks) + j, ctx - 1) for j, ctx in enumerate(decode_ctx)]
    slot_mapping = [tables[i][p // block_size] * block_size + p % block_size for i, p in new_positions]
    mapping = torch.tensor(slot_mapping, dtype=torch.long, device=DEVICE)
    new_k, new_v = kv.k[0].index_select(0, mapping).clone(), kv.v[0].index_select(0, mapping).clone()

    prefill_slots = padded_kv_slots(tables[: len(chunks)], prefill_ctx, block_size, DEVICE)
    spans, row = [], 0
    for i, (chunk, ctx) in enumerate(zip(chunks, prefill_ctx, strict=True)):
        spans.append(PrefillSpan(start=row, length=chunk, context_len=ctx, kv_slots=prefill_slots[i, :ctx]))
        row += chunk
    group = DecodeGroup(
        start=num_prefill,
        end=num_prefill + len(decode_ctx),
        kv_slots=padded_kv_slots(tables[len(chunks) :], decode_ctx, block_size, DEVICE),
        context_lens=torch.tensor(decode_ctx, device=DEVICE),
        positions=torch.tensor([c - 1 for c in decode_ctx], device=DEVICE),
    )
    batch = AttentionBatch(
        positions=torch.tensor([p for _, p in new_positions], device=DEVICE),
        slot_mapping=mapping,
        prefills=spans,
        num_prefill_tokens=num_prefill,
        decode_groups=[group],
    )
    scale = head_dim**-0.5
    want = engine_paged_attention(q, new_k, new_v, kv, 0, batch, scale, window)

    prefill_cache = PagedCache(
        cache.k_cache, cache.v_cache, cache.block_tables[: len(chunks)], cache.context_lens[: len(chunks)], block_size
    )
    decode_cache = PagedCache(
        cache.k_cache, cache.v_cache, cache.block_tables[len(chunks) :], cache.context_lens[len(chunks) :], block_size
    )
    got_prefill = _prefill(reference, q[:num_prefill], prefill_cache, chunks, window)
    got_decode = _decode(reference, q[num_prefill:], decode_cache, window)
    torch.testing.assert_close(got_prefill, want[:num_prefill], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_decode, want[num_prefill:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU: larger shapes and torch's sync detector (`gpu`: skipped without CUDA), a compile check that needs none


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 256])
def test_gpu_large_shapes_match_reference(dtype: torch.dtype, window: int | None) -> None:
    rng = random.Random(59)
    block_size, num_kv_heads, group, head_dim = 16, 8, 4, 128
    decode_ctx = [rng.randint(1, 3000) for _ in range(48)] + [16 * 64, 16 * 64 + 1]
    cache = _paged_cache(decode_ctx, block_size, num_kv_heads, head_dim, dtype, seed=59)
    q = _queries(len(decode_ctx), num_kv_heads * group, head_dim, dtype, seed=59)
    _close(_decode(tl_attn, q, cache, window), _decode(reference, q, cache, window), dtype)

    chunks = [rng.randint(1, 600) for _ in range(12)] + [512, 1]
    contexts = [c + rng.choice([0, 0, rng.randint(1, 2000)]) for c in chunks]
    cache = _paged_cache(contexts, block_size, num_kv_heads, head_dim, dtype, seed=61)
    q = _queries(sum(chunks), num_kv_heads * group, head_dim, dtype, seed=61)
    _close(_prefill(tl_attn, q, cache, chunks, window), _prefill(reference, q, cache, chunks, window), dtype)


@pytest.mark.gpu
def test_gpu_launches_never_sync_with_the_host() -> None:
    """torch's own sync detector on the device, after the JIT has compiled (compiling may sync)."""
    chunks, contexts = [450, 3, 77], [450, 1203, 77]
    cache = _paged_cache(contexts + [684] * 64, 16, 8, 128, torch.bfloat16, seed=67)
    q = _queries(sum(chunks) + 64, 32, 128, torch.bfloat16, seed=67)
    prefill_cache = PagedCache(cache.k_cache, cache.v_cache, cache.block_tables[:3], cache.context_lens[:3], 16)
    decode_cache = PagedCache(cache.k_cache, cache.v_cache, cache.block_tables[3:], cache.context_lens[3:], 16)
    query_start = _query_start(chunks)
    p = sum(chunks)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        pre = tl_attn.paged_prefill_attention(
            q[:p], cache.k_cache, cache.v_cache, prefill_cache.block_tables, query_start,
            prefill_cache.context_lens, 16, 128**-0.5, None,
        )
        return pre, _decode(tl_attn, q[p:], decode_cache, None)

    step()
    with cuda_sync_trap():
        pre, dec = step()
    assert torch.isfinite(pre).all() and torch.isfinite(dec).all()


# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set, this process's kernels are interpreter
# objects that the compiler cannot take. Inner strides are 1 and rows 16-byte aligned, as the JIT
# specializes real launches, so what is compiled is what a GPU would run.
_COMPILE_SCRIPT = r"""
import inspect, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_attention as k
from kernels.tuning import TABLE

INDEX_POINTERS = {"tables_ptr", "ctx_ptr", "query_start_ptr"}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
""" + COMPILE_OR_SKIP + r"""
done = 0
for dtype in ("fp16", "bf16", "fp32"):
    for head_dim, group in ((64, 1), (128, 4), (256, 3)):
        tiles = TABLE["sm90"].attention.pick(TORCH_DTYPES[dtype], head_dim)
        common = {"QUERIES_PER_KV": group, "BLOCK_D": head_dim, "BLOCK_N": tiles.block_n,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST_DOT": False}
        block_m = max(tiles.max_block_m, 16)
        jobs = [
            (k._paged_decode_kernel, {"BLOCK_G": 16, **common}),
            (k._paged_prefill_kernel, {"BLOCK_Q": block_m // group, "BLOCK_M": block_m, **common}),
        ]
        for fn, constexprs in jobs:
            names = list(inspect.signature(fn.fn).parameters)
            for name in names:
                if name.startswith("stride_") and name.endswith(("d", "tm")):
                    constexprs[name] = 1
            signature, attrs = {}, {}
            for i, name in enumerate(names):
                if name in constexprs:
                    signature[name] = "constexpr"
                    continue
                if name.endswith("_ptr"):
                    signature[name] = "*i32" if name in INDEX_POINTERS else "*" + dtype
                else:
                    signature[name] = "fp32" if name == "qk_scale" else "i32"
                if name.endswith("_ptr") or name.startswith("stride_") and name != "stride_tb":
                    attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = compile_or_skip(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                GPUTarget("cuda", 90, 32),
                {"num_warps": tiles.num_warps, "num_stages": 2},
            )
            assert compiled.asm.get("cubin"), fn
            done += 1
print("compiled", done)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects, so compile both kernels for H100 (no GPU needed)."""
    compile_for_sm90(_COMPILE_SCRIPT, "compiled 18", timeout_s=600)
