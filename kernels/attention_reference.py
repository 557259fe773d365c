"""Plain-torch paged attention: the CPU path and the test oracle of `kernels.triton_attention`.

Shapes (H query heads, Hkv KV heads, H % Hkv == 0, D head dim):
    k_cache, v_cache  [num_blocks * block_size, Hkv, D]   one layer's flat token slots
    block_tables      [rows, max_blocks] int32/int64      block ids of positions 0, block_size, ...;
                                                          entries past a row's context are unused
                                                          (-1 or anything else: never read)
    context_lens      [rows] int32/int64                  cached tokens of each sequence, this step's included

Decode: `q [B, H, D]`, one new token per sequence at position `context_lens[b] - 1`.
Prefill: `q [T, H, D]` holds the chunks of N sequences back to back; sequence n owns rows
`query_start[n] : query_start[n + 1]` (`query_start [N + 1]`, 0 first and T last), and its chunk is
the last `query_start[n + 1] - query_start[n]` positions of its context (the cached prefix before it),
attended causally.

A key at position k is visible to a query at position p when k <= p and, with a sliding window w,
p - k < w (Mistral's convention, as in `engine.attention`). Softmax runs in float32 whatever the
dtype; the result is rounded to q's dtype once. A row that sees no key (a context of 0) is all zeros.

Isolation: values of slots a row may not read (past its context, stale blocks, other sequences'
data, NaN/Inf included) never reach its output. They are replaced by zeros before any arithmetic,
because a masked score still multiplies its value and 0 * NaN is NaN.
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "check_decode_args",
    "check_prefill_args",
    "paged_decode_attention",
    "paged_prefill_attention",
]

# Query rows attended at once in prefill: bounds the [Hkv, G, rows, context] float32 score tensor
# (a 4K-token context with 32 heads is 64 MiB per 128 rows) without a visible cost in speed.
_PREFILL_QUERY_ROWS = 128
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------
# argument checks, shared with the Triton launchers: the kernels do not bounds-check what they read,
# so every shape mismatch must be an exception before a launch


def _check_common(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    out: torch.Tensor | None,
    what: str,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 3:
        raise ValueError(f"{what}: q and k_cache must be 3-d, got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{what}: v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{what}: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"{what}: q head_dim {head_dim} differs from the cache's {k_cache.shape[2]}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"{what}: q, k_cache and v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, {v_cache.dtype})")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device == context_lens.device):
        raise ValueError(f"{what}: all tensors must be on one device")
    if block_size < 1 or k_cache.shape[0] % block_size != 0:
        raise ValueError(f"{what}: block_size {block_size} does not divide the cache's {k_cache.shape[0]} slots")
    if block_tables.dim() != 2 or context_lens.dim() != 1 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"{what}: block_tables {tuple(block_tables.shape)} must have one row per context_lens entry "
            f"{tuple(context_lens.shape)}"
        )
    if block_tables.dtype not in _INDEX_DTYPES or context_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{what}: block_tables and context_lens must be int32 or int64")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{what}: sliding_window must be None or >= 1, got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"{what}: out must match q ({tuple(q.shape)}, {q.dtype}), got {tuple(out.shape)}, {out.dtype}")


def check_decode_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError on shapes, dtypes or devices the decode kernels cannot take (no host sync)."""
    _check_common(q, k_cache, v_cache, block_tables, context_lens, block_size, sliding_window, out, "decode")
    if context_lens.shape[0] != q.shape[0]:
        raise ValueError(f"decode: {context_lens.shape[0]} context_lens for {q.shape[0]} query rows")


def check_prefill_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError on shapes, dtypes or devices the prefill kernels cannot take (no host sync)."""
    _check_common(q, k_cache, v_cache, block_tables, context_lens, block_size, sliding_window, out, "prefill")
    if query_start.dim() != 1 or query_start.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(
            f"prefill: query_start needs {context_lens.shape[0] + 1} entries, got {tuple(query_start.shape)}"
        )
    if query_start.dtype not in _INDEX_DTYPES or query_start.device != q.device:
        raise ValueError("prefill: query_start must be int32 or int64 on q's device")


def _check_context_values(context_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int, what: str) -> None:
    # Value checks need the numbers on the host; the reference has them anyway, the kernels do not
    # sync for them (they read no table entry past the table's width instead).
    if context_lens.numel() == 0:
        return
    capacity = block_tables.shape[1] * block_size
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 0 or hi > capacity:
        raise ValueError(f"{what}: context_lens must lie in 0..{capacity} (block_tables width x block_size)")


# --------------------------------------------------------------------------------------------------
# the math


def _context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of `positions` (any shape, all inside the context) through one or more tables."""
    blocks = torch.gather(block_table.long(), -1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks * block_size + positions % block_size


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Lq, H, D], keys/values [B, n, Hkv, D], visible [B, Lq, n] -> float32 [B, Lq, H, D]."""
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    group = num_heads // num_kv_heads
    q = q.float().reshape(batch, num_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqkgd,bnkd->bkgqn", q, keys.float()) * scale
    mask = visible[:, None, None]  # [B, 1, 1, Lq, n]
    scores = scores.masked_fill(~mask, float("-inf"))
    # A row that sees nothing has all -inf scores, whose softmax is NaN: it becomes zeros instead.
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    out = torch.einsum("bkgqn,bnkd->bqkgd", probs, values.float())
    return out.reshape(batch, num_q, num_heads, head_dim)


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
    """Attention of one new token per sequence over its cached context: q [B, H, D] -> [B, H, D].

    Writes into `out` when given (any strides) and returns it.
    """
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, block_size, sliding_window, out)
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    _check_context_values(context_lens, block_tables, block_size, "decode")
    ctx = context_lens.long()
    max_ctx = int(ctx.max())
    if max_ctx == 0:
        out.zero_()
        return out
    positions = torch.arange(max_ctx, device=q.device)
    visible = positions.unsqueeze(0) < ctx.unsqueeze(1)  # [B, n]
    if sliding_window is not None:
        visible &= (ctx - 1).unsqueeze(1) - positions.unsqueeze(0) < sliding_window
    # Invisible positions read slot 0 of the table's first block (a valid index) and are zeroed below.
    safe_positions = torch.where(visible, positions.unsqueeze(0), 0)
    slots = torch.where(visible, _context_slots(block_tables, safe_positions, block_size), 0).reshape(-1)
    keep = visible[:, :, None, None]
    keys = k_cache.index_select(0, slots).reshape(q.shape[0], max_ctx, *k_cache.shape[1:])
    values = v_cache.index_select(0, slots).reshape(q.shape[0], max_ctx, *v_cache.shape[1:])
    keys = torch.where(keep, keys, torch.zeros((), dtype=keys.dtype, device=keys.device))
    values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    result = _attend(q.unsqueeze(1), keys, values, visible.unsqueeze(1), scale)
    out.copy_(result.squeeze(1))
    return out


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
    """Causal attention of each sequence's chunk over its cached prefix and itself: q [T, H, D] -> [T, H, D].

    Writes into `out` when given (any strides) and returns it.
    """
    check_prefill_args(q, k_cache, v_cache, block_tables, query_start, context_lens, block_size, sliding_window, out)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    _check_context_values(context_lens, block_tables, block_size, "prefill")
    starts = query_start.tolist()
    contexts = context_lens.tolist()
    if starts[0] != 0 or starts[-1] != q.shape[0] or any(b < a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"prefill: query_start must rise from 0 to {q.shape[0]} (the rows of q)")
    for n in range(num_seqs):
        first, last, ctx = starts[n], starts[n + 1], contexts[n]
        num_q = last - first
        if num_q == 0:
            continue
        if num_q > ctx:
            raise ValueError(f"prefill: sequence {n} has {num_q} query rows but a context of {ctx}")
        prefix = ctx - num_q
        for row in range(0, num_q, _PREFILL_QUERY_ROWS):
            rows = min(_PREFILL_QUERY_ROWS, num_q - row)
            q_pos = torch.arange(prefix + row, prefix + row + rows, device=q.device)
            # Only the keys some row of this slice can see are gathered: the causal end and the window start.
            lo = 0 if sliding_window is None else max(0, prefix + row - sliding_window + 1)
            k_pos = torch.arange(lo, prefix + row + rows, device=q.device)
            visible = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            if sliding_window is not None:
                visible &= q_pos.unsqueeze(1) - k_pos.unsqueeze(0) < sliding_window
            slots = _context_slots(block_tables[n], k_pos, block_size)
            keys = k_cache.index_select(0, slots).unsqueeze(0)
            values = v_cache.index_select(0, slots).unsqueeze(0)
            result = _attend(q[first + row : first + row + rows].unsqueeze(0), keys, values, visible.unsqueeze(0), scale)
            out[first + row : first + row + rows] = result.squeeze(0)
    return out
