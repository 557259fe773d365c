"""Batched multi-LoRA ops (Punica-style SGMV/BGMV shrink and expand).

`kernels.lora_ops` is the one API the engine calls; it dispatches to Triton on CUDA and to the
plain-torch reference (`kernels.reference`) elsewhere. Tiling per device: `kernels.tuning`.
"""

from kernels.lora_ops import LoraBatch, LoraOps

__all__ = ["LoraBatch", "LoraOps"]
