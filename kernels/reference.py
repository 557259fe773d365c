"""Plain-torch references for the four LoRA ops: the CPU path and the test oracle.

Shapes (S = device slots, R = max rank padded, T = tokens):
    x        [T, in_features]               activations
    lora_a   [S, R, in_features]            stacked A of every slot (rows beyond an adapter's rank are 0)
    lora_b   [S, out_features, R]           stacked B of every slot (cols beyond an adapter's rank are 0)
    scaling  [S]                            lora_alpha / r (or / sqrt(r) for rslora), per slot
    h        [T, R]                         shrink output, input of expand
    out      [T, >= slice_offset + out_features]  base output; expand adds into a column slice of it

BGMV: one slot index per token (`token_slots`, -1 = no adapter), used for decode.
SGMV: segments of contiguous tokens sharing a slot (`seg_starts`, `seg_lens`, `seg_slots`), for prefill.
Shrink returns h in x's dtype; expand accumulates `(h @ B^T) * scale` into `out` in place.
"""

from __future__ import annotations

import torch


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    active = token_slots >= 0
    if not bool(active.any()):
        return out
    rows = active.nonzero().squeeze(1)
    a = lora_a.index_select(0, token_slots.index_select(0, rows))  # [n, R, in]
    out.index_copy_(0, rows, torch.bmm(a, x.index_select(0, rows).unsqueeze(2)).squeeze(2))
    return out


def bgmv_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
    slice_offset: int = 0,
) -> None:
    active = token_slots >= 0
    if not bool(active.any()):
        return
    rows = active.nonzero().squeeze(1)
    slots = token_slots.index_select(0, rows)
    b = lora_b.index_select(0, slots)  # [n, out, R]
    delta = torch.bmm(b, h.index_select(0, rows).unsqueeze(2)).squeeze(2)
    delta = delta * scaling.index_select(0, slots).to(delta.dtype).unsqueeze(1)
    width = lora_b.shape[1]
    out[:, slice_offset : slice_offset + width].index_add_(0, rows, delta.to(out.dtype))


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot < 0 or length == 0:
            continue
        out[start : start + length] = x[start : start + length] @ lora_a[slot].t()
    return out


def sgmv_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
    slice_offset: int = 0,
) -> None:
    width = lora_b.shape[1]
    scales = scaling.tolist()
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot < 0 or length == 0:
            continue
        delta = (h[start : start + length] @ lora_b[slot].t()) * scales[slot]
        out[start : start + length, slice_offset : slice_offset + width] += delta.to(out.dtype)
