"""The architecture facts the engine needs, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_pos: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @staticmethod
    def from_hf_config(cfg: Any) -> ModelArch:
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type must be one of {sorted(SUPPORTED_FAMILIES)}, got {model_type!r}")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {act!r}")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope = _rope_parameters(cfg)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")
        if model_type == "qwen2":
            qkv_bias = True
            window = cfg.sliding_window if getattr(cfg, "use_sliding_window", False) else None
        else:
            qkv_bias = bool(getattr(cfg, "attention_bias", False))
            window = getattr(cfg, "sliding_window", None) if model_type == "mistral" else None
        return ModelArch(
            family=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0)),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0) or 1.0),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0) or 1.0),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0) or 4.0),
            rope_original_max_pos=int(rope.get("original_max_position_embeddings", 8192) or 8192),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            sliding_window=int(window) if window else None,
        )


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    # transformers >= 5 keeps everything in `rope_parameters`; 4.x has `rope_scaling` + `rope_theta`.
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = getattr(cfg, "rope_scaling", None)
    out = dict(scaling) if isinstance(scaling, dict) else {}
    out.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return out
