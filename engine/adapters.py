"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors`, validate against the base."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.errors import AdapterLoadError
from engine.model import TARGET_MODULES
from engine.model_arch import ModelArch

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class LoraModuleWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter in host memory, validated: weights keyed by (layer, target module)."""

    adapter_id: str
    source: str
    rank: int  # the largest rank over its modules
    targets: tuple[str, ...]
    weights: dict[tuple[int, str], LoraModuleWeights]
    base_model: str | None

    @property
    def nbytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for w in self.weights.values())


def _pattern_value(patterns: dict[str, float], key: str, default: float) -> float:
    # PEFT's rule: a pattern applies when the module key ends with it at a dot boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", key):
            return value
    return default


def load_peft_adapter(
    adapter_id: str, directory: Path, arch: ModelArch, max_rank: int, dtype: torch.dtype, source: str | None = None
) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter. Every refusal names the field and the offending value."""

    def fail(message: str) -> AdapterLoadError:
        return AdapterLoadError(adapter_id, message)

    config_path = directory / "adapter_config.json"
    weights_path = directory / "adapter_model.safetensors"
    if not config_path.is_file():
        raise fail(f"adapter_config.json not found in {directory}")
    if not weights_path.is_file():
        raise fail(f"adapter_model.safetensors not found in {directory} (only safetensors adapters are served)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise fail("adapter_config.json must hold a JSON object")

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise fail(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise fail("use_dora=true is not supported (DoRA adapters need the magnitude vector path)")
    if config.get("modules_to_save"):
        raise fail(f"modules_to_save={config['modules_to_save']!r} is not supported (only LoRA deltas are served)")
    if config.get("bias", "none") != "none":
        raise fail(f"bias={config['bias']!r} is not supported; allowed: 'none'")
    if config.get("fan_in_fan_out"):
        raise fail("fan_in_fan_out=true is not supported for Llama-family models")
    for option in ("lora_bias", "use_qalora"):
        if config.get(option):
            raise fail(f"{option}=true is not supported")
    default_rank = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_rank))
    rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    use_rslora = bool(config.get("use_rslora", False))
    for name, rank in [("r", default_rank), *((f"rank_pattern[{k!r}]", v) for k, v in rank_pattern.items())]:
        if rank > max_rank:
            raise fail(f"{name}={rank} is above max_lora_rank={max_rank}")
        if rank < 1:
            raise fail(f"{name}={rank} must be >= 1")

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise fail(f"adapter_model.safetensors is not a readable safetensors file: {exc}") from exc

    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise fail(f"tensor {key!r} is not a LoRA A/B weight of a supported module {TARGET_MODULES}")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in TARGET_MODULES:
            raise fail(f"target module {module!r} is not supported; allowed: {', '.join(TARGET_MODULES)}")
        if layer >= arch.num_layers:
            raise fail(f"tensor {key!r} is for layer {layer} but the base model has {arch.num_layers} layers")
        pieces.setdefault((layer, module), {})[which] = tensor
    if not pieces:
        raise fail("adapter_model.safetensors holds no LoRA weights")

    shapes = arch.module_shapes()
    weights: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, module), ab in sorted(pieces.items()):
        if set(ab) != {"A", "B"}:
            raise fail(f"layer {layer} {module}: needs both lora_A and lora_B, found only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        in_features, out_features = shapes[module]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape[0] != out_features or b.shape[1] != rank:
            raise fail(
                f"layer {layer} {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base "
                f"(expects lora_A [r, {in_features}] and lora_B [{out_features}, r]); wrong base model?"
            )
        if rank > max_rank:
            raise fail(f"layer {layer} {module}: rank {rank} is above max_lora_rank={max_rank}")
        module_key = f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{module}"
        alpha = _pattern_value(alpha_pattern, module_key, default_alpha)
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weights[(layer, module)] = LoraModuleWeights(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scaling)

    return LoraAdapter(
        adapter_id=adapter_id,
        source=source or str(directory),
        rank=max(w.lora_a.shape[0] for w in weights.values()),
        targets=tuple(m for m in TARGET_MODULES if any(mod == m for _, mod in weights)),
        weights=weights,
        base_model=config.get("base_model_name_or_path"),
    )
