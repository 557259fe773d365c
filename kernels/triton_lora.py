"""Triton kernels for the four LoRA ops, same signatures and semantics as `kernels.reference`.

BGMV (decode, one slot per token) is a batch of matrix-vector products, so it is memory-bound: the
work is streaming each token's A (R x in) or B (out x R) slice once. Shrink therefore spreads a token
over several programs by rank rows (no reduction needed) and, when that is still too few programs to
fill the GPU, splits the `in` dim and reduces fp32 partials in a second tiny kernel (deterministic,
unlike atomics, which keeps float32 greedy decoding reproducible). Expand tiles the output dim.

SGMV (prefill, contiguous segments sharing a slot) uses `tl.dot` on [BLOCK_M tokens] tiles. The grid
is (segments, cdiv(T, BLOCK_M)[, out tiles]): the true segment lengths live on the device and reading
them would be a host sync, so programs past their segment's end exit immediately.

All kernels accumulate in fp32, take every tensor's strides (so `out` may be a column slice of a fused
qkv / gate-up output), mask ragged edges, and treat slot -1 as "no adapter". BGMV tile sizes, warps and
the split-K target come from `kernels.tuning` (per device) or from an explicit `TritonLora(tiling)`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_common import dot_precision, upcast_dot
from kernels.tuning import LoraTiling, tuning_for

__all__ = ["TritonLora", "bgmv_expand", "bgmv_shrink", "sgmv_expand", "sgmv_shrink"]

# When the kernels run under the interpreter (CPU tensors), there is no SM count to query; a small
# number keeps the interpreted grids small while still exercising the split paths.
_CPU_SM_COUNT = 4


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pad_rank(rank: int) -> int:
    # tl.dot needs every block dim >= 16 (SGMV only; BGMV pads to the next power of two).
    return max(16, triton.next_power_of_2(rank))


def _check_shapes(rows: int, index_len: int | None, cols: int, expected_cols: int, what: str) -> None:
    # Kernels do not bounds-check against the tensors' real extents, so a mismatch the reference
    # would reject with an exception would silently read or write out of bounds here.
    if index_len is not None and index_len != rows:
        raise ValueError(f"{what}: token_slots has {index_len} entries for {rows} rows")
    if cols != expected_cols:
        raise ValueError(f"{what}: expected {expected_cols} columns, got {cols}")


def _pick_split_k(useful_programs: int, k_blocks: int, device: torch.device, tiling: LoraTiling) -> int:
    """How many slices to cut the `in` dim into so the launch fills the GPU (1 = no split)."""
    target = _sm_count(device) * tiling.programs_per_sm
    # Within a factor of two of the target the second (reduce) launch costs more than it wins.
    if 2 * useful_programs >= target or k_blocks <= 1:
        return 1
    return max(1, min(triton.cdiv(target, max(useful_programs, 1)), k_blocks, tiling.max_split_k))


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    slots_ptr,
    out_ptr,
    rank,
    in_features,
    k_per_split,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_ot,
    stride_or,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(slots_ptr + tok)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    out = out_ptr + pid_k.to(tl.int64) * stride_os + tok * stride_ot + offs_r * stride_or
    if slot < 0:
        # Writing the zeros here spares h a separate zero-fill launch.
        tl.store(out, tl.zeros([BLOCK_R], dtype=out_ptr.dtype.element_ty), mask=r_mask)
        return
    slot = slot.to(tl.int64)

    k_lo = pid_k * k_per_split
    k_end = tl.minimum(k_lo + k_per_split, in_features)
    x_row = x_ptr + tok * stride_xt
    a_base = a_ptr + slot * stride_as + offs_r[:, None].to(tl.int64) * stride_ar
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    # Loop bounds stay plain integers (older Triton interpreters cannot iterate over tensor bounds).
    for k in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xv = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_base + offs_k[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += av.to(tl.float32) * xv[None, :]
    res = tl.sum(acc, axis=1)
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _reduce_splits_kernel(
    part_ptr,
    out_ptr,
    num_rows,
    rank,
    num_splits,
    stride_ps,
    stride_pt,
    stride_pr,
    stride_ot,
    stride_or,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_t[:, None] < num_rows) & (offs_r[None, :] < rank)
    rows = offs_t[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(part_ptr + s * stride_ps + rows * stride_pt + offs_r[None, :] * stride_pr, mask=mask)
    tl.store(
        out_ptr + rows * stride_ot + offs_r[None, :] * stride_or, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _bgmv_expand_kernel(
    h_ptr,
    b_ptr,
    slots_ptr,
    scale_ptr,
    out_ptr,
    rank,
    out_features,
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + tok)
    if slot < 0:
        return
    slot = slot.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < out_features

    hv = tl.load(h_ptr + tok * stride_ht + offs_r * stride_hr, mask=r_mask, other=0.0).to(tl.float32)
    b_ptrs = b_ptr + slot * stride_bs + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br
    bv = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(bv * hv[None, :], axis=1) * tl.load(scale_ptr + slot).to(tl.float32)

    o_ptrs = out_ptr + tok * stride_ot + offs_n * stride_on
    base = tl.load(o_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    starts_ptr,
    lens_ptr,
    slots_ptr,
    out_ptr,
    rank,
    in_features,
    k_per_split,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_ot,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg_len = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg)
    # The grid covers the longest possible segment (T rows); most tiles of short segments land here.
    if (slot < 0) | (pid_m * BLOCK_M >= seg_len):
        return
    start = tl.load(starts_ptr + seg)
    slot = slot.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    k_lo = pid_k * k_per_split
    k_end = tl.minimum(k_lo + k_per_split, in_features)

    x_base = x_ptr + rows[:, None] * stride_xt
    a_base = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xv = tl.load(x_base + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(xv.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, at.to(xv.dtype), acc, input_precision=DOT_PRECISION)
    out = out_ptr + pid_k.to(tl.int64) * stride_os + rows[:, None] * stride_ot + offs_r[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    h_ptr,
    b_ptr,
    starts_ptr,
    lens_ptr,
    slots_ptr,
    scale_ptr,
    out_ptr,
    rank,
    out_features,
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= seg_len):
        return
    start = tl.load(starts_ptr + seg)
    slot = slot.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank

    hv = tl.load(
        h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr,
        mask=m_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    bt = tl.load(
        b_ptr + slot * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        acc = tl.dot(hv.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(hv, bt.to(hv.dtype), input_precision=DOT_PRECISION)
    acc = acc * tl.load(scale_ptr + slot).to(tl.float32)

    mask = m_mask[:, None] & n_mask[None, :]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
    base = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers (signatures mirror kernels.reference exactly)


def _split(
    useful_programs: int, in_features: int, block_k: int, device: torch.device, tiling: LoraTiling
) -> tuple[int, int]:
    """(slices, `in` columns per slice) of a shrink launch with `useful_programs` programs per slice."""
    k_blocks = triton.cdiv(in_features, block_k)
    split = _pick_split_k(useful_programs, k_blocks, device, tiling)
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    return triton.cdiv(in_features, k_per_split), k_per_split


def _partials(out: torch.Tensor, split: int, zeroed: bool) -> tuple[torch.Tensor, int]:
    """Where a shrink kernel writes, and that tensor's slice stride: `out`, or fp32 partials per slice."""
    if split == 1:
        return out, 0
    # Zeroed when the kernel leaves rows unwritten (SGMV rows outside every segment).
    alloc = torch.zeros if zeroed else torch.empty
    dest = alloc(split, *out.shape, dtype=torch.float32, device=out.device)
    return dest, dest.stride(0)


def _reduced(dest: torch.Tensor, out: torch.Tensor, tiling: LoraTiling) -> torch.Tensor:
    """`out`, with the partials of a split launch summed into it (deterministic, unlike atomics)."""
    if dest is out:
        return out
    splits, rows, rank = dest.shape
    block_r = triton.next_power_of_2(rank)
    block_t = max(1, min(triton.next_power_of_2(rows), tiling.tile_elems // block_r))
    _reduce_splits_kernel[(triton.cdiv(rows, block_t),)](
        dest, out, rows, rank, splits, *dest.stride(), *out.stride(), BLOCK_T=block_t, BLOCK_R=block_r
    )
    return out


def _expand_target(
    h: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, slice_offset: int, index_len: int | None, what: str
) -> torch.Tensor:
    """The column slice of `out` an expand adds into, after checking every shape the kernel trusts."""
    out_features, rank = lora_b.shape[1], lora_b.shape[2]
    view = out[:, slice_offset : slice_offset + out_features]
    _check_shapes(h.shape[0], index_len, h.shape[1], rank, f"{what} h")
    _check_shapes(h.shape[0], out.shape[0], view.shape[1], out_features, f"{what} out slice")
    return view


def _sgmv_block_m(num_tokens: int, num_segments: int) -> int:
    # Short segments (many sequences in one prefill) waste most of a big tile; long ones want reuse of A/B.
    avg = max(1, num_tokens // max(num_segments, 1))
    return 16 if avg <= 16 else 32 if avg <= 64 else 64


class TritonLora:
    """The four ops launched with one tiling, or (None) with each launch's device entry in `kernels.tuning`.

    This module's `bgmv_shrink`, ... are the methods of `TritonLora()`, so the module itself is the
    implementation `kernels.lora_ops.LoraOps` picks; a tiling sweep builds one instance per candidate.
    """

    def __init__(self, tiling: LoraTiling | None = None) -> None:
        self.tiling = tiling

    def _tiling(self, device: torch.device) -> LoraTiling:
        return self.tiling if self.tiling is not None else tuning_for(device).lora

    def bgmv_shrink(self, x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        num_tokens, in_features = x.shape
        rank = lora_a.shape[1]
        _check_shapes(num_tokens, token_slots.shape[0], lora_a.shape[2], in_features, "bgmv_shrink lora_a")
        if num_tokens == 0 or rank == 0 or in_features == 0:
            return torch.zeros(num_tokens, rank, dtype=x.dtype, device=x.device)
        tiling = self._tiling(x.device)
        # Splitting by rank rows first costs only L2 re-reads of x; stop at 4 rows so those stay cheap.
        target = _sm_count(x.device) * tiling.programs_per_sm
        block_r = triton.next_power_of_2(rank)
        while block_r > 4 and num_tokens * triton.cdiv(rank, block_r) < target:
            block_r //= 2
        block_k = min(max(16, tiling.tile_elems // block_r), triton.next_power_of_2(in_features))
        r_blocks = triton.cdiv(rank, block_r)
        split, k_per_split = _split(num_tokens * r_blocks, in_features, block_k, x.device, tiling)
        out = torch.empty(num_tokens, rank, dtype=x.dtype, device=x.device)
        # Every program writes its rows (zeros for slot -1), so the partials need no zero-fill.
        dest, stride_os = _partials(out, split, zeroed=False)
        _bgmv_shrink_kernel[(num_tokens, r_blocks, split)](
            x, lora_a, token_slots, dest, rank, in_features, k_per_split,
            *x.stride(), *lora_a.stride(), stride_os, *dest.stride()[-2:],
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=tiling.bgmv_num_warps,
        )  # fmt: skip
        return _reduced(dest, out, tiling)

    def bgmv_expand(
        self,
        h: torch.Tensor,
        lora_b: torch.Tensor,
        token_slots: torch.Tensor,
        scaling: torch.Tensor,
        out: torch.Tensor,
        slice_offset: int = 0,
    ) -> None:
        view = _expand_target(h, lora_b, out, slice_offset, token_slots.shape[0], "bgmv_expand")
        num_tokens, (out_features, rank) = h.shape[0], lora_b.shape[1:]
        if num_tokens == 0 or out_features == 0 or rank == 0:
            return
        tiling = self._tiling(h.device)
        rank_pad = triton.next_power_of_2(rank)
        block_n = min(max(16, tiling.tile_elems // rank_pad), 1024, triton.next_power_of_2(out_features))
        _bgmv_expand_kernel[(num_tokens, triton.cdiv(out_features, block_n))](
            h, lora_b, token_slots, scaling, view, rank, out_features,
            *h.stride(), *lora_b.stride(), *view.stride(),
            BLOCK_N=block_n, BLOCK_R=rank_pad, num_warps=tiling.bgmv_num_warps,
        )  # fmt: skip

    def sgmv_shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        seg_starts: torch.Tensor,
        seg_lens: torch.Tensor,
        seg_slots: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens, in_features = x.shape
        rank, num_segments = lora_a.shape[1], seg_starts.shape[0]
        _check_shapes(num_tokens, None, lora_a.shape[2], in_features, "sgmv_shrink lora_a")
        out = torch.zeros(num_tokens, rank, dtype=x.dtype, device=x.device)
        if num_tokens == 0 or num_segments == 0 or rank == 0 or in_features == 0:
            return out
        tiling = self._tiling(x.device)
        rank_pad = _pad_rank(rank)
        block_m = _sgmv_block_m(num_tokens, num_segments)
        # Keep the [BLOCK_K, R] A tile near 4K elements so wide ranks do not spill registers.
        block_k = min(max(32, tiling.tile_elems // rank_pad), 128, max(16, triton.next_power_of_2(in_features)))
        m_tiles = triton.cdiv(num_tokens, block_m)
        # Segments partition at most T rows, so real tiles number at most m_tiles + segments.
        split, k_per_split = _split(m_tiles + num_segments - 1, in_features, block_k, x.device, tiling)
        dest, stride_os = _partials(out, split, zeroed=True)
        _sgmv_shrink_kernel[(num_segments, m_tiles, split)](
            x, lora_a, seg_starts, seg_lens, seg_slots, dest, rank, in_features, k_per_split,
            *x.stride(), *lora_a.stride(), stride_os, *dest.stride()[-2:],
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_pad,
            DOT_PRECISION=dot_precision(x.dtype), UPCAST_DOT=upcast_dot(x),
            num_warps=8 if block_m * rank_pad >= 4096 else 4, num_stages=3,
        )  # fmt: skip
        return _reduced(dest, out, tiling)

    def sgmv_expand(
        self,
        h: torch.Tensor,
        lora_b: torch.Tensor,
        seg_starts: torch.Tensor,
        seg_lens: torch.Tensor,
        seg_slots: torch.Tensor,
        scaling: torch.Tensor,
        out: torch.Tensor,
        slice_offset: int = 0,
    ) -> None:
        view = _expand_target(h, lora_b, out, slice_offset, None, "sgmv_expand")
        num_tokens, (out_features, rank), num_segments = h.shape[0], lora_b.shape[1:], seg_starts.shape[0]
        if num_tokens == 0 or num_segments == 0 or out_features == 0 or rank == 0:
            return
        rank_pad = _pad_rank(rank)
        block_m = _sgmv_block_m(num_tokens, num_segments)
        block_n = min(128 if rank_pad <= 64 else 64, max(16, triton.next_power_of_2(out_features)))
        grid = (num_segments, triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
        # At 4 warps a 64x128 fp32 accumulator plus the loaded `out` tile (or a 128-wide rank tile)
        # spills registers on sm_90 (ptxas -v); 8 warps halves the per-thread share.
        num_warps = 8 if max(block_m * block_n, block_m * rank_pad, rank_pad * block_n) >= 8192 else 4
        _sgmv_expand_kernel[grid](
            h, lora_b, seg_starts, seg_lens, seg_slots, scaling, view, rank, out_features,
            *h.stride(), *lora_b.stride(), *view.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_pad,
            DOT_PRECISION=dot_precision(h.dtype), UPCAST_DOT=upcast_dot(h),
            num_warps=num_warps, num_stages=2,
        )  # fmt: skip


_BY_DEVICE = TritonLora()
bgmv_shrink = _BY_DEVICE.bgmv_shrink
bgmv_expand = _BY_DEVICE.bgmv_expand
sgmv_shrink = _BY_DEVICE.sgmv_shrink
sgmv_expand = _BY_DEVICE.sgmv_expand
