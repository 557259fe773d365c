"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache, with LoRA-aware projections.

One file, no framework (gpt-fast style). q/k/v and gate/up are fused into one matmul each; LoRA
deltas are added into column slices of the fused output through `kernels.LoraOps` (on the CPU,
`engine.cpu_lora`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_linear
from engine.attention import AttentionBatch, KVCache, paged_attention
from engine.model_arch import ModelArch
from engine.pointwise import TORCH, Pointwise
from kernels.lora_ops import LoraBatch

# Fused projection -> the LoRA target modules it holds, in column order.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                 "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraWeights:
    """Stacked device slots of one target module in one layer (owned by the adapter slot table)."""

    lora_a: torch.Tensor  # [S, R, in]
    lora_b: torch.Tensor  # [S, out, R]; the slot table's is a view of [S, R, out] memory (see AdapterSlots)
    scaling: torch.Tensor  # [S]


class LoraApply(Protocol):
    """What applies LoRA deltas: `kernels.LoraOps` (Triton / torch reference) or `engine.cpu_lora.NativeLoraOps`."""

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        batch: LoraBatch,
        slice_offset: int = 0,
    ) -> None: ...


@dataclass
class LoraContext:
    """What every LoRA layer of one step needs: slot weights, per-token slots, the op dispatcher."""

    weights: list[dict[str, LoraWeights]]  # per layer: module name -> slots
    batch: LoraBatch
    ops: LoraApply


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if arch.rope_type == "linear":
        return inv / arch.rope_factor
    if arch.rope_type == "llama3":
        low_wavelen = arch.rope_original_max_pos / arch.rope_low_freq_factor
        high_wavelen = arch.rope_original_max_pos / arch.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / arch.rope_factor, inv)
        smooth = (arch.rope_original_max_pos / wavelen - arch.rope_low_freq_factor) / (
            arch.rope_high_freq_factor - arch.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / arch.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    """A norm's weight and eps; the model's `pointwise` applies it (fused with the residual add)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps


class LoraLinear(nn.Module):
    """A (possibly fused) projection; `slices` name the target modules and their output widths."""

    def __init__(self, in_features: int, slices: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.slices = slices
        out = sum(slices.values())
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN's copy of the weight once `pack_for_cpu` ran

    def pack_for_cpu(self) -> None:
        """From now on multiply through oneDNN with a packed copy (engine.cpu_linear).

        The plain weight's memory is released: `weight` keeps its shape and dtype on the meta device,
        so the model's size still adds up, but its values live only in `packed` from here on.
        """
        self.packed = cpu_linear.pack(self.weight)
        self.weight = nn.Parameter(torch.empty_like(self.weight, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoraContext | None, layer: int) -> torch.Tensor:
        if self.packed is not None:
            out = cpu_linear.linear(x, self.packed, self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        if lora is not None and lora.batch.any_adapter:
            weights = lora.weights[layer]
            offset = 0
            for name, width in self.slices.items():
                slot = weights.get(name)
                if slot is not None:
                    lora.ops.apply(x, out, slot.lora_a, slot.lora_b, slot.scaling, lora.batch, offset)
                offset += width
        return out


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, index: int) -> None:
        super().__init__()
        self.arch = arch
        self.index = index
        h = arch.hidden_size
        self.input_layernorm = RMSNorm(h, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps)
        self.qkv_proj = LoraLinear(
            h, {"q_proj": arch.q_size, "k_proj": arch.kv_size, "v_proj": arch.kv_size}, arch.qkv_bias
        )
        self.o_proj = LoraLinear(arch.q_size, {"o_proj": h}, False)
        self.gate_up_proj = LoraLinear(
            h, {"gate_proj": arch.intermediate_size, "up_proj": arch.intermediate_size}, False
        )
        self.down_proj = LoraLinear(arch.intermediate_size, {"down_proj": h}, False)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBatch,
        kv: KVCache,
        lora: LoraContext | None,
        pw: Pointwise,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's MLP output, the residual stream before it).

        The residual add is left to the next norm (`add_rms_norm`, vLLM's layout), so the sum and the
        norm are one pass; the first layer has no residual yet, and CausalLM adds the last one.
        """
        a = self.arch
        t = x.shape[0]
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            hidden, residual = pw.rms_norm(x, ln1.weight, ln1.eps), x
        else:
            hidden, residual = pw.add_rms_norm(x, residual, ln1.weight, ln1.eps)
        qkv = self.qkv_proj(hidden, lora, self.index)
        q, k = pw.rope_qk(qkv, cos, sin, a.num_heads, a.num_kv_heads, a.head_dim)
        v = qkv[:, a.q_size + a.kv_size :].reshape(t, a.num_kv_heads, a.head_dim)
        ctx = paged_attention(q, k, v, kv, self.index, attn, a.head_dim**-0.5, a.sliding_window)
        hidden, residual = pw.add_rms_norm(self.o_proj(ctx.reshape(t, a.q_size), lora, self.index), residual,
                                           ln2.weight, ln2.eps)
        return self.down_proj(pw.silu_mul(self.gate_up_proj(hidden, lora, self.index)), lora, self.index), residual


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head_weight: torch.Tensor | None = None  # None when tied to the embedding
        self.lm_head_packed: torch.Tensor | None = None  # oneDNN's copy (pack_linears_for_cpu)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
        # The layers' norms, rotary embedding and SiLU: the torch reference unless the engine picks the
        # native CPU ops (engine.cpu_pointwise.for_device).
        self.pointwise: Pointwise = TORCH

    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head_weight is None else self.lm_head_weight

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attn: AttentionBatch, kv: KVCache, lora: LoraContext | None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        freqs = attn.positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn, kv, lora, self.pointwise)
        if residual is None:  # no layers
            return self.pointwise.rms_norm(x, self.norm.weight, self.norm.eps)
        return self.pointwise.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def pack_linears_for_cpu(self) -> None:
        """Every projection and the LM head through oneDNN with packed weights (see engine.cpu_linear).

        The LM head is packed as a copy: when it is tied, the embedding lookup still needs the plain one.
        Packing twice is a no-op.
        """
        if self.lm_head_packed is not None:
            return
        for layer in self.layers:
            for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                proj.pack_for_cpu()
        self.lm_head_packed = cpu_linear.pack(self.lm_head)
        if self.lm_head_weight is not None:  # untied: nothing else reads the plain copy
            self.lm_head_weight = torch.empty_like(self.lm_head_weight, device="meta")

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_packed is not None:
            return cpu_linear.linear(hidden, self.lm_head_packed, None).float()
        return F.linear(hidden, self.lm_head).float()
