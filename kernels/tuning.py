"""Tiling of the Triton kernels, per device: one table looked up by the device a launch runs on.

As vLLM's per-device JSON configs: an entry per GPU architecture (`sm90` for the H100 / H200), a
default for every other device (and for Triton's CPU interpreter). A launch takes its entry from
`tuning_for(device)`; a sweep (`loadtests/gpu_check.py`) passes its candidates explicitly
(`kernels.triton_lora.TritonLora(tiling)`), so nothing global is ever overwritten.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraTiling:
    """BGMV / split-K knobs of `kernels.triton_lora` (SGMV tiles follow from the shapes)."""

    # Elements per loaded BGMV tile: 4-8K over 4 warps keeps several 16-byte vector loads per
    # thread in flight without spilling registers.
    tile_elems: int = 4096
    bgmv_num_warps: int = 4
    # Programs per SM to aim for in memory-bound launches: two waves hide the tail of the first.
    programs_per_sm: int = 2
    # Most slices the `in` dim of a shrink is cut into (each slice adds a row of fp32 partials).
    max_split_k: int = 16


@dataclass(frozen=True)
class AttentionTiling:
    """Keys per inner-loop tile, the most query rows (tokens x heads of a group) per prefill tile, warps."""

    block_n: int
    max_block_m: int
    num_warps: int


@dataclass(frozen=True)
class AttentionTable:
    """Attention tiles by operand width (fp32 vs 16-bit) and head dim (up to 128, wider)."""

    fp32: AttentionTiling
    fp32_wide: AttentionTiling
    half: AttentionTiling
    half_wide: AttentionTiling

    def pick(self, dtype: torch.dtype, block_d: int) -> AttentionTiling:
        wide = block_d > 128
        if dtype == torch.float32:
            return self.fp32_wide if wide else self.fp32
        return self.half_wide if wide else self.half


@dataclass(frozen=True)
class DeviceTuning:
    lora: LoraTiling = field(default_factory=LoraTiling)
    # ptxas -v on sm_90 with the kernels specialized as the JIT does (unit inner strides, 16-byte
    # aligned rows): no spills for fp16/bf16 and at most 16 bytes for fp32, where 4 warps or 32-key
    # tiles spill hundreds. IEEE fp32 dots run on the FMA units with their operands in registers,
    # hence smaller tiles and more warps there.
    attention: AttentionTable = field(
        default_factory=lambda: AttentionTable(
            fp32=AttentionTiling(block_n=64, max_block_m=32, num_warps=8),
            fp32_wide=AttentionTiling(block_n=32, max_block_m=16, num_warps=8),
            half=AttentionTiling(block_n=64, max_block_m=64, num_warps=4),
            half_wide=AttentionTiling(block_n=32, max_block_m=64, num_warps=8),
        )
    )


# Every GPU since sm_70 has the same 64K registers per SM, so the sm_90 register fit is also the safe
# default; an architecture gets its own entry once `loadtests/gpu_check.py`'s sweep has measured it.
DEFAULT = DeviceTuning()
TABLE: dict[str, DeviceTuning] = {
    "sm90": DeviceTuning(lora=LoraTiling(tile_elems=4096, bgmv_num_warps=4, programs_per_sm=2, max_split_k=16)),
}


def device_key(device: torch.device) -> str:
    """`sm90` for a compute capability 9.0 GPU; `cpu` (the interpreter) otherwise."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=16)
def tuning_for(device: torch.device) -> DeviceTuning:
    return TABLE.get(device_key(device), DEFAULT)
