"""What every Triton kernel of this package decides the same way: dot precision and the bf16 upcast."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    # Float32 must match the torch reference (and PEFT) token for token; TF32, Triton's default for fp32
    # dots, would not.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(t: torch.Tensor) -> bool:
    # Triton's CPU interpreter keeps bfloat16 as raw uint16 bits and feeds them to np.matmul; there the
    # dots run in float32 instead (exact for bf16 products). GPUs keep bf16 tensor cores.
    return t.dtype == torch.bfloat16 and not t.is_cuda
