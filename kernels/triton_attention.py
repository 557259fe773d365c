"""Triton paged attention, same signatures and semantics as `kernels.attention_reference`.

Both kernels walk block tables in place (no gathered copy of the context) with an online softmax in
float32, and treat the H / Hkv query heads of one KV head as extra rows of one tile, so each K/V tile
is read once per group rather than once per query head (GQA).

Decode: one program per (sequence, KV head). It reads only the tiles between the window start and the
context end, so a sliding window bounds the work, and any context length is a loop, not a grid size.
Prefill: one program per (query tile, KV head), where a query tile is BLOCK_Q tokens of one sequence
times its group's heads. Chunk lengths live on the device and reading them would be a host sync, so the
grid covers the most tiles any split of T rows into N sequences can need (T // BLOCK_Q + N); each program
finds its sequence by binary search over `query_start` and programs past their chunk's end exit.

Isolation: K/V loads are masked to the positions the tile may see (inside the context, inside the
window, inside the block table), so stale slots, unused table entries (-1) and other sequences' data
(NaN/Inf included) are never loaded: masked lanes read 0, and scores are additionally forced to -inf.
Within a prefill tile a column's load mask is shared by all rows, so what one row may not see but another
may (its causal future in the chunk, keys just out of its window) is loaded, its own sequence's finite
data, and weighted exactly zero.

Tile sizes and warps per dtype and head dim come from the device's entry in `kernels.tuning`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.attention_reference import check_decode_args, check_prefill_args
from kernels.triton_common import dot_precision, upcast_dot
from kernels.tuning import AttentionTiling, tuning_for

__all__ = ["paged_decode_attention", "paged_prefill_attention"]

# tl.dot needs every block dim >= 16.
_MIN_DOT_DIM = 16
# "No window" is a window wider than any context: one code path, no extra compiled variant.
_NO_WINDOW = 2**31 - 1
_LOG2_E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _online_softmax_step(
    q,
    k_tile,
    v_tile,
    visible,
    m_i,
    l_i,
    acc,
    qk_scale,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One key tile of flash attention: q [M, D], k_tile [D, N], v_tile [N, D], visible [M, N]."""
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), k_tile.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k_tile, input_precision=DOT_PRECISION)
    scores = tl.where(visible, qk * qk_scale, float("-inf"))
    # m_i starts finite (see callers), so a fully masked tile gives alpha = 1 and p = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST_DOT:
        pv = tl.dot(p, v_tile.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _load_kv_tile(
    table,
    k_head,
    v_head,
    pos,
    lo,
    hi,
    block_size,
    max_blocks,
    offs_d,
    d_mask,
    stride_tm,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
):
    """K^T [D, N] and V [N, D] of key positions `pos` through one block table, and which were loaded.

    Only positions in [lo, hi) are loaded; masked lanes read 0, never a slot the row may not see.
    """
    logical_block = pos // block_size
    # The table-width test only keeps reads in bounds when a caller breaks the contract.
    loadable = (pos >= lo) & (pos < hi) & (logical_block < max_blocks)
    block = tl.load(table + logical_block * stride_tm, mask=loadable, other=0).to(tl.int64)
    slots = block * block_size + (pos % block_size)
    k_tile = tl.load(
        k_head + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
        mask=loadable[None, :] & d_mask[:, None],
        other=0.0,
    )
    v_tile = tl.load(
        v_head + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
        mask=loadable[:, None] & d_mask[None, :],
        other=0.0,
    )
    return k_tile, v_tile, loadable


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    ctx_ptr,
    out_ptr,
    qk_scale,
    block_size,
    max_blocks,
    window,
    head_dim,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tm,
    stride_ob,
    stride_oh,
    stride_od,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < QUERIES_PER_KV
    d_mask = offs_d < head_dim
    heads = (kv_head * QUERIES_PER_KV + offs_g).to(tl.int64)
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )

    # The query sits at position ctx - 1; the window keeps keys with (ctx - 1) - k < window.
    lo = tl.maximum(ctx - window, 0)
    table = tables_ptr + seq * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range((lo // BLOCK_N) * BLOCK_N, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        k_tile, v_tile, visible = _load_kv_tile(
            table, k_head, v_head, pos, lo, ctx, block_size, max_blocks, offs_d, d_mask,
            stride_tm, stride_ks, stride_kd, stride_vs, stride_vd,
        )  # fmt: skip
        m_i, l_i, acc = _online_softmax_step(
            q, k_tile, v_tile, visible[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT
        )
    # A context of 0 sees nothing: zeros, as in the reference.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence n whose first tile index, query_start[n] // BLOCK_Q + n, is <= tile."""
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    query_start_ptr,
    ctx_ptr,
    out_ptr,
    qk_scale,
    block_size,
    max_blocks,
    window,
    head_dim,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tm,
    stride_ot,
    stride_oh,
    stride_od,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, tile_id, BLOCK_Q)
    if seq < 0:  # only when query_start[0] > 0 breaks the contract; reads nothing out of bounds
        return
    q_first = tl.load(query_start_ptr + seq).to(tl.int32)
    num_q = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_first
    tile = tile_id - (q_first // BLOCK_Q + seq)
    if tile * BLOCK_Q >= num_q:
        return
    seq = seq.to(tl.int64)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    prefix = ctx - num_q

    # Row r of the tile is token r // QUERIES_PER_KV of the tile and head r % QUERIES_PER_KV of the group.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    token = tile * BLOCK_Q + offs_m // QUERIES_PER_KV
    heads = (kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV).to(tl.int64)
    row_mask = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (token < num_q)
    d_mask = offs_d < head_dim
    rows = (q_first + token).to(tl.int64)
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    q_pos = prefix + token

    # Keys any row of the tile can see: from the first query's window start to the last query.
    hi = tl.minimum(prefix + (tile + 1) * BLOCK_Q, ctx)
    lo = tl.maximum(prefix + tile * BLOCK_Q - window + 1, 0)
    table = tables_ptr + seq * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        k_tile, v_tile, loadable = _load_kv_tile(
            table, k_head, v_head, pos, lo, hi, block_size, max_blocks, offs_d, d_mask,
            stride_tm, stride_ks, stride_kd, stride_vs, stride_vd,
        )  # fmt: skip
        distance = q_pos[:, None] - pos[None, :]
        visible = loadable[None, :] & (distance >= 0) & (distance < window)
        m_i, l_i, acc = _online_softmax_step(
            q, k_tile, v_tile, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


# --------------------------------------------------------------------------------------------------
# launchers (signatures mirror kernels.attention_reference exactly)


def _block_d(head_dim: int) -> int:
    return max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim))


def _window(sliding_window: int | None) -> int:
    return _NO_WINDOW if sliding_window is None else min(sliding_window, _NO_WINDOW)


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Every stride of q, k_cache, v_cache, block_tables and out, in the kernels' parameter order."""
    return tuple(stride for t in tensors for stride in t.stride())


def _shared_meta(q: torch.Tensor, group: int, block_d: int, tiles: AttentionTiling) -> dict[str, Any]:
    """The meta-parameters both kernels take, decided the same way for both."""
    return {
        "QUERIES_PER_KV": group,
        "BLOCK_N": tiles.block_n,
        "BLOCK_D": block_d,
        "DOT_PRECISION": dot_precision(q.dtype),
        "UPCAST_DOT": upcast_dot(q),
        "num_warps": tiles.num_warps,
    }


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, block_size, sliding_window, out)
    out = torch.empty_like(q) if out is None else out
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0 or num_heads == 0 or head_dim == 0:
        return out
    num_kv_heads = k_cache.shape[1]
    group, block_d = num_heads // num_kv_heads, _block_d(head_dim)
    tiles = tuning_for(q.device).attention.pick(q.dtype, block_d)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale * _LOG2_E, block_size, block_tables.shape[1], _window(sliding_window), head_dim,
        *_strides(q, k_cache, v_cache, block_tables, out),
        BLOCK_G=max(_MIN_DOT_DIM, triton.next_power_of_2(group)),
        **_shared_meta(q, group, block_d, tiles),
    )  # fmt: skip
    return out


def _prefill_block_m(num_tokens: int, num_seqs: int, group: int, max_block_m: int) -> int:
    # Rows are tokens x heads of a group; short chunks (many sequences per step) waste most of a big tile.
    avg_rows = max(1, num_tokens // max(num_seqs, 1)) * group
    block_m = min(max_block_m, triton.next_power_of_2(avg_rows))
    return max(_MIN_DOT_DIM, block_m, triton.next_power_of_2(group))


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    check_prefill_args(q, k_cache, v_cache, block_tables, query_start, context_lens, block_size, sliding_window, out)
    out = torch.empty_like(q) if out is None else out
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or num_heads == 0 or head_dim == 0:
        return out
    num_kv_heads = k_cache.shape[1]
    group, block_d = num_heads // num_kv_heads, _block_d(head_dim)
    tiles = tuning_for(q.device).attention.pick(q.dtype, block_d)
    block_m = _prefill_block_m(num_tokens, num_seqs, group, tiles.max_block_m)
    block_q = block_m // group
    _paged_prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, query_start, context_lens, out,
        scale * _LOG2_E, block_size, block_tables.shape[1], _window(sliding_window), head_dim, num_seqs,
        *_strides(q, k_cache, v_cache, block_tables, out),
        BLOCK_Q=block_q, BLOCK_M=block_m,
        **_shared_meta(q, group, block_d, tiles),
    )  # fmt: skip
    return out
