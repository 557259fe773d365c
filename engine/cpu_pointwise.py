"""Which pointwise path (RMSNorm, rotary embedding, SiLU * up) an engine on the CPU takes.

The torch reference (engine.pointwise.TorchPointwise) costs a dozen small torch ops per layer, each
a full pass over the activations, and each a parallel region once a tensor passes torch's grain;
`NativePointwise` (engine/csrc/pointwise.cpp, built by `engine.native_ops`) does each in one pass.
Float32 on the CPU only: other dtypes and devices keep the reference.

LORASERVE_CPU_POINTWISE picks the path: `auto` (default: native for float32 on the CPU when the ops
build, else the reference with the reason logged by the build), `native` (must build: an error
otherwise), `torch` (the reference).
"""

from __future__ import annotations

import os

import torch

from engine import native_ops
from engine.pointwise import TORCH, Pointwise

MODE_ENV = "LORASERVE_CPU_POINTWISE"
MODES = ("auto", "native", "torch")


class NativePointwiseUnavailable(RuntimeError):
    """LORASERVE_CPU_POINTWISE=native, and the ops cannot be built or loaded here (the message says why)."""


class NativePointwise:
    """`engine.pointwise.Pointwise` through `torch.ops.loraserve` (float32 CPU tensors)."""

    backend = "native"

    def __init__(self, library: native_ops.Library) -> None:
        self._lib = library

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._lib.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lib.add_rms_norm(x, residual, weight, eps)

    def rope_qk(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lib.rope_qk(qkv, cos, sin, num_heads, num_kv_heads, head_dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._lib.silu_mul(gate_up)


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {value!r}")
    return value


def for_device(
    device: torch.device | str, dtype: torch.dtype, loader: native_ops.NativeLoader = native_ops.LOADER
) -> Pointwise:
    """The native ops for float32 on the CPU when they build (LORASERVE_CPU_POINTWISE), else the reference."""
    chosen = mode()
    if chosen == "torch" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return TORCH
    lib = loader.library()
    if lib is None:
        if chosen == "native":
            raise NativePointwiseUnavailable(f"{MODE_ENV}=native but the native ops cannot be built: {loader.failure}")
        return TORCH
    return NativePointwise(lib)
