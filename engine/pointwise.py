"""The decoder layer's pointwise work: RMSNorm (after the residual add), rotary embedding, SiLU * up.

`TorchPointwise` is the reference (plain torch, any device and dtype; what the model ran before
the native ops existed, op for op) and the test oracle; `engine.cpu_pointwise.NativePointwise` does
the same in one native pass per op on the CPU (engine/csrc/pointwise.cpp). The model takes one of
them per engine (`CausalLM.pointwise`), chosen by `engine.cpu_pointwise.for_device`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Pointwise(Protocol):
    backend: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] -> weight * (x * rsqrt(mean(x^2) + eps)), computed in float32."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x)."""
        ...

    def rope_qk(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv [T, (H + 2 Hkv) D], cos/sin [T, D] -> q [T, H, D], k [T, Hkv, D], both rotated."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
        ...


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D] (rotate-half layout, as Hugging Face Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class TorchPointwise:
    """The reference: Hugging Face Llama's arithmetic in plain torch ops."""

    backend = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        summed = residual + x
        return self.rms_norm(summed, weight, eps), summed

    def rope_qk(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = qkv.shape[0]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].reshape(t, num_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].reshape(t, num_kv_heads, head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


TORCH = TorchPointwise()
