"""Paged KV cache storage and attention over it.

The cache is one tensor per layer for K and V, laid out as flat token slots
(`num_blocks * block_size`); a sequence's block table maps its positions to slots. The block
manager decides which blocks a sequence owns; this file only reads and writes them.

Isolation rule: attention reads only slots the row's own sequence has written. A masked score
still multiplies its value, and 0 * NaN is NaN, so a padded read of another sequence's K/V (a
batch-mate whose adapter produced NaN/Inf, or a freed block's stale contents) would poison the row
even though the mask hides it. Hence `padded_kv_slots` pads with each row's own position 0, and
no read ever reaches past a row's length into the unwritten tail of its last block.

Three paths attend over the cache: the torch path below (gathers each row's K/V into a padded batch,
then SDPA; the reference and test oracle); on the CPU, the native op of `engine.cpu_attention`,
which reads each row's K/V once, in place, through the block tables (`PagedRows`) and never reads a
padded slot at all; and the Triton paged kernels of `kernels.triton_attention` (`KernelRows`: the
default on CUDA, and on the CPU under Triton's interpreter when asked), which also walk the block
tables in place. The model runner picks one per engine (`engine.attention_backend`) and builds only
that path's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import cpu_attention


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pad_block: bool | None = None,
    ) -> None:
        # One block past the block manager's: padding rows of a CUDA-graph decode step write their K/V
        # into its first slot (`pad_slot`), which no sequence owns and none reads. None: on CUDA only.
        if pad_block is None:
            pad_block = torch.device(device).type == "cuda"
        shape = (num_layers, (num_blocks + int(pad_block)) * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_slot: int | None = num_blocks * block_size if pad_block else None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def padded_kv_slots(
    tables: Sequence[Sequence[int]], lengths: Sequence[int], block_size: int, device: torch.device | str
) -> torch.Tensor:
    """[n, max(lengths)] flat cache slots of positions 0..length-1 of each sequence (block tables).

    Positions past a row's length are padding (masked in attention) and repeat the row's own first
    slot: position 0 is in the cache before any step attends over the sequence, so the padded
    values are the row's own finite data and contribute exactly zero (see the module docstring).
    """
    max_len = max(lengths)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(tables), max_blocks, dtype=torch.long)
    for i, blocks in enumerate(tables):
        owned = blocks[:max_blocks]
        table[i, : len(owned)] = torch.tensor(owned, dtype=torch.long)
    slots = (table.unsqueeze(2) * block_size + torch.arange(block_size)).reshape(len(tables), -1)[:, :max_len]
    valid = torch.arange(max_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return torch.where(valid, slots, slots[:, :1]).to(device)


def block_table_tensor(tables: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """[n, longest table] int64 block tables, -1 past each sequence's last block (never a real block)."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([[*t, *([-1] * (width - len(t)))] for t in tables], dtype=torch.long, device=device)


@dataclass(frozen=True)
class PagedRows:
    """The native path's view of a step: row r of the batch is position `positions[r]` of the sequence
    whose block table is `block_tables[row_seq[r]]`; it attends to that sequence's positions up to its own."""

    block_tables: torch.Tensor  # [N, max_blocks] int64, -1 past each sequence's last block
    row_seq: torch.Tensor  # [T] int64


@dataclass(frozen=True)
class KernelRows:
    """The Triton path's view of a step: batch rows [0, num_prefill_seqs) are prefill chunks whose tokens
    are rows query_start[n]:query_start[n + 1] of q; the other rows are one decode token each."""

    block_tables: torch.Tensor  # [N, max_blocks] int64, -1 past each sequence's last block
    context_lens: torch.Tensor  # [N] int64, this step's tokens included
    query_start: torch.Tensor  # [num_prefill_seqs + 1] int64 over the prefill rows, num_prefill_tokens last
    num_prefill_seqs: int


@dataclass
class PrefillSpan:
    """A chunk of one sequence's prompt in this step: rows [start, start+length) of the batch."""

    start: int
    length: int
    context_len: int  # tokens in the cache for this sequence after this step
    kv_slots: torch.Tensor  # [context_len] flat cache slots of positions 0..context_len-1


@dataclass
class DecodeGroup:
    """Decode rows [start, end) of similar context length, attended together (padded to the longest)."""

    start: int
    end: int
    kv_slots: torch.Tensor  # [n, max_context] flat slots, padded with each row's own first slot
    context_lens: torch.Tensor  # [n]
    positions: torch.Tensor  # [n] position of each decode token


@dataclass
class AttentionBatch:
    """Where each token of the step lives. Rows [0, num_prefill_tokens) are prefill spans; the rest decode."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V is written to
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    decode_groups: list[DecodeGroup]
    # Set when the native op attends (then `prefills` and `decode_groups` are empty: torch path only).
    paged_rows: PagedRows | None = None
    # Set when the Triton kernels attend (then `prefills` and `decode_groups` are empty too).
    kernel_rows: KernelRows | None = None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: KVCache,
    layer: int,
    attn: AttentionBatch,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend each token to its sequence's cached context.

    q [T, H, D], k/v [T, Hkv, D] -> [T, H, D].
    """
    k_cache, v_cache = kv.k[layer], kv.v[layer]
    k_cache.index_copy_(0, attn.slot_mapping, k)
    v_cache.index_copy_(0, attn.slot_mapping, v)
    if attn.paged_rows is not None:
        op = cpu_attention.native_op()
        if op is None:
            raise RuntimeError("a batch built for the native attention op reached an engine without it")
        rows = attn.paged_rows
        return op(q, k_cache, v_cache, rows.block_tables, rows.row_seq, attn.positions, kv.block_size, scale,
                  sliding_window or 0)
    if attn.kernel_rows is not None:
        return _kernel_attention(q, k_cache, v_cache, kv.block_size, attn.num_prefill_tokens, attn.kernel_rows,
                                 scale, sliding_window)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for span in attn.prefills:
        rows = slice(span.start, span.start + span.length)
        keys = k_cache.index_select(0, span.kv_slots).transpose(0, 1)  # [Hkv, ctx, D]
        values = v_cache.index_select(0, span.kv_slots).transpose(0, 1)
        q_pos = torch.arange(span.context_len - span.length, span.context_len, device=q.device)
        k_pos = torch.arange(span.context_len, device=q.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        if sliding_window is not None:
            mask &= (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)) < sliding_window
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        out[rows] = o.transpose(0, 1)
    for group in attn.decode_groups:
        d, max_ctx = group.kv_slots.shape
        flat = group.kv_slots.reshape(-1)
        keys = k_cache.index_select(0, flat).reshape(d, max_ctx, *k_cache.shape[1:]).transpose(1, 2)
        values = v_cache.index_select(0, flat).reshape(d, max_ctx, *v_cache.shape[1:]).transpose(1, 2)
        k_pos = torch.arange(max_ctx, device=q.device).unsqueeze(0)
        mask = k_pos < group.context_lens.unsqueeze(1)
        if sliding_window is not None:
            mask &= (group.positions.unsqueeze(1) - k_pos) < sliding_window
        o = F.scaled_dot_product_attention(
            q[group.start : group.end].unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=gqa,
        )
        out[group.start : group.end] = o.squeeze(2)
    return out


def _kernel_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_size: int,
    num_prefill_tokens: int,
    rows: KernelRows,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Prefill chunks through the varlen prefill kernel, decode rows through the decode kernel, in place."""
    from kernels import triton_attention  # imported on use: Triton is optional where this path is not taken

    out = torch.empty_like(q)
    p, n = num_prefill_tokens, rows.num_prefill_seqs
    if p:
        triton_attention.paged_prefill_attention(
            q[:p], k_cache, v_cache, rows.block_tables[:n], rows.query_start, rows.context_lens[:n], block_size,
            scale, sliding_window, out=out[:p],
        )
    if p < q.shape[0]:
        triton_attention.paged_decode_attention(
            q[p:], k_cache, v_cache, rows.block_tables[n:], rows.context_lens[n:], block_size, scale,
            sliding_window, out=out[p:],
        )
    return out
