"""Build the engine's model from a Hugging Face model directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from engine.model import CausalLM, rope_inv_freq
from engine.model_arch import ModelArch


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[key] = handle.get_tensor(key)
    return tensors


def load_causal_lm(directory: Path, arch: ModelArch, dtype: torch.dtype, device: str) -> CausalLM:
    raw = read_safetensors(directory)
    weights = {k.removeprefix("model."): v for k, v in raw.items()}

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise KeyError(f"weight {name!r} missing from {directory}")
        return weights[name]

    with torch.device("meta"):
        model = CausalLM(arch)
    model = model.to_empty(device=device)
    state: dict[str, torch.Tensor] = {"embed_tokens.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    for i in range(arch.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        state[p + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        state[p + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
        state[p + "qkv_proj.weight"] = torch.cat([take(attn + f"{m}.weight") for m in ("q_proj", "k_proj", "v_proj")])
        if arch.qkv_bias:
            state[p + "qkv_proj.bias"] = torch.cat([take(attn + f"{m}.bias") for m in ("q_proj", "k_proj", "v_proj")])
        state[p + "o_proj.weight"] = take(attn + "o_proj.weight")
        state[p + "gate_up_proj.weight"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        state[p + "down_proj.weight"] = take(mlp + "down_proj.weight")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    model.to(dtype=dtype)
    model.inv_freq = rope_inv_freq(arch).to(device)  # stays float32, as Hugging Face keeps it
    if not arch.tie_word_embeddings:
        head = weights.get("lm_head.weight", raw.get("lm_head.weight"))
        if head is None:
            raise KeyError(f"weight 'lm_head.weight' missing from {directory} (tie_word_embeddings is false)")
        model.lm_head_weight = head.to(device=device, dtype=dtype)
    model.eval()
    return model


def dummy_causal_lm(arch: ModelArch, dtype: torch.dtype, device: str, seed: int = 0, std: float = 0.02) -> CausalLM:
    """Random weights of `arch`'s shape, drawn on the device: no checkpoint needed (benchmarks)."""
    with torch.device("meta"):
        model = CausalLM(arch)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32) * std)
    model.to(dtype=dtype)
    model.inv_freq = rope_inv_freq(arch).to(device)
    if not arch.tie_word_embeddings:
        model.lm_head_weight = (
            torch.randn(arch.vocab_size, arch.hidden_size, generator=gen, device=device, dtype=torch.float32) * std
        ).to(dtype)
    model.eval()
    return model
