"""Mixed-adapter LoRA on the CPU in one native call per projection (engine/csrc/lora.cpp).

The torch reference (kernels/reference.py, the oracle) costs about fifteen small torch ops per
projection and step: gathers, nonzero, bmm, index_add. `NativeLoraOps` has the same `apply` as
`kernels.LoraOps` and does each token's shrink and expand with its own slot in one parallel loop.
An engine on the CPU whose LoRA backend is `auto` (the default) uses it when the native ops build
(`engine.native_ops`); `torch` or `triton` (the `lora_backend` setting, LORA_KERNEL_BACKEND) keep
`kernels.LoraOps` as asked.
"""

from __future__ import annotations

import torch

from engine import native_ops
from kernels.lora_ops import LoraBatch, LoraOps


class NativeLoraOps:
    """`kernels.LoraOps.apply` through `torch.ops.loraserve.lora_apply`: BGMV over every row of the step."""

    backend = "native"

    def __init__(self, library: native_ops.Library) -> None:
        self._lora_apply = library.lora_apply

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        batch: LoraBatch,
        slice_offset: int = 0,
    ) -> None:
        """out[:, slice_offset : slice_offset + out_features] += scale * (x @ A^T) @ B^T, per token's slot."""
        if batch.any_adapter:
            self._lora_apply(x, out, lora_a, lora_b, scaling, batch.token_slots, slice_offset)


def for_device(
    ops: LoraOps, device: torch.device | str, loader: native_ops.NativeLoader = native_ops.LOADER
) -> LoraOps | NativeLoraOps:
    """The native ops for an `auto` backend on the CPU when they build; `ops` itself otherwise."""
    if ops.backend != "auto" or torch.device(device).type != "cpu":
        return ops
    lib = loader.library()
    return ops if lib is None else NativeLoraOps(lib)
