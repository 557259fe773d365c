"""Batched multi-LoRA ops (Punica-style SGMV/BGMV shrink and expand).

`kernels.lora_ops` is the one API the engine calls; it dispatches to Triton on CUDA and to the
plain-torch reference (`kernels.reference`) elsewhere.
"""

from kernels.lora_ops import LoraOps, bgmv_expand, bgmv_shrink, sgmv_expand, sgmv_shrink

__all__ = ["LoraOps", "bgmv_expand", "bgmv_shrink", "sgmv_expand", "sgmv_shrink"]
