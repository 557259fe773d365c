"""adapter_config.json: every field checked against the served base, with PEFT's LoRA semantics.

`parse_adapter_config` raises AdapterLoadError naming the field and its value for anything this
engine cannot serve exactly as transformers + PEFT would: wrong types, out-of-range values, LoRA
variants (DoRA, aLoRA, ...), extra trained modules (modules_to_save, trainable tokens) and target
modules the engine does not apply LoRA to (lm_head, embed_tokens: refused, not ignored). It also
holds the one comparison of an adapter's `base_model_name_or_path` with the served base.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from engine.errors import AdapterLoadError
from engine.model import TARGET_MODULES
from engine.model_arch import ModelArch
from engine.peft_patterns import MAX_PATTERN_KEYS, PatternTable, compile_pattern, first_key, pattern_table

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20  # PEFT writes ~1-2 KB; anything near this is not a LoRA config
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha's default, used when the file has none
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Modules PEFT can put LoRA on in a Llama-family model that this engine does not apply LoRA to.
UNSERVED_MODULES = ("lm_head", "model.embed_tokens")
# Options that change what the adapter computes at inference; each must be unset.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "modules_to_save": "fully trained copies of base modules are not served, only LoRA deltas",
    "trainable_token_indices": "trained token embeddings are not served",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not served",
    "layer_replication": "layer replication changes the base model's depth",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "monteclora_config": "MonteCLoRA is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing is not served",
    "kasa_config": "KaSA is not served",
}
UNSUPPORTED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA adapters need the magnitude vector path",
    "fan_in_fan_out": "Llama-family projections are nn.Linear ([out, in] weights)",
    "lora_bias": "a LoRA B bias is not served",
    "use_qalora": "QALoRA pools the input and is only for GPTQ bases",
}


def module_path(layer: int, module: str) -> str:
    """The module's name in the base model, as PEFT matches it ("model.layers.3.self_attn.q_proj")."""
    return f"model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModuleSelector:
    """target_modules / exclude_modules: a list of names (suffix match) or a regex (full match), as PEFT."""

    names: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None

    def selects(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return any(path == name or path.endswith("." + name) for name in self.names)


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: ModuleSelector
    exclude_modules: ModuleSelector
    layers_to_transform: frozenset[int] | None  # PEFT applies it only with a list of target_modules
    rank_pattern: PatternTable
    alpha_pattern: PatternTable
    rank_values: Mapping[str, int] = field(default_factory=dict)
    alpha_values: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    selection: str = ""  # the file's target_modules / layers_to_transform / exclude_modules, for messages

    def selects(self, layer: int, module: str) -> bool:
        path = module_path(layer, module)
        if self.exclude_modules.selects(path) or not self.target_modules.selects(path):
            return False
        if self.layers_to_transform is None or self.target_modules.regex is not None:
            return True
        return layer in self.layers_to_transform

    def rank_of(self, layer: int, module: str) -> int:
        key = first_key(self.rank_pattern, module_path(layer, module))
        return self.r if key is None else self.rank_values[key]

    def scaling_of(self, layer: int, module: str) -> float:
        key = first_key(self.alpha_pattern, module_path(layer, module))
        alpha = self.lora_alpha if key is None else self.alpha_values[key]
        rank = self.rank_of(layer, module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_adapter_config(adapter_id: str, data: bytes, arch: ModelArch, max_rank: int) -> LoraConfig:
    """Decode and validate adapter_config.json's bytes (size already bounded by the reader)."""

    def fail(message: str) -> AdapterLoadError:
        return AdapterLoadError(adapter_id, message)

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"adapter_config.json is not UTF-8 text (byte {exc.start})") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"adapter_config.json is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise fail("adapter_config.json is nested too deeply") from exc
    if not isinstance(raw, dict):
        raise fail(f"adapter_config.json must hold a JSON object, got {type(raw).__name__}")
    if not raw:
        raise fail("adapter_config.json is an empty object; a PEFT LoRA config needs peft_type, r and target_modules")
    try:
        return _parse(raw, arch, max_rank)
    except ValueError as exc:
        raise fail(str(exc)) from exc


def _parse(raw: dict[str, object], arch: ModelArch, max_rank: int) -> LoraConfig:
    for name in ("peft_type", "r", "target_modules"):
        if raw.get(name) is None:
            raise ValueError(f"{name} is missing from adapter_config.json (a PEFT LoRA config has peft_type, r "
                             f"and target_modules)")
    peft_type = raw["peft_type"]
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {_shown(peft_type)}")
    rank = _rank("r", raw["r"], max_rank)
    alpha = _alpha("lora_alpha", raw.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    use_rslora = _flag(raw, "use_rslora")
    for name, why in UNSUPPORTED_FLAGS.items():
        if _flag(raw, name):
            raise ValueError(f"{name}=true is not supported ({why})")
    bias = raw.get("bias")
    if bias not in (None, "none"):
        raise ValueError(f"bias={_shown(bias)} is not supported; allowed: 'none'")
    for name, why in UNSUPPORTED_OPTIONS.items():
        if raw.get(name) not in (None, False, "", [], {}):
            raise ValueError(f"{name}={_shown(raw[name])} is not supported ({why})")
    for name in ("base_model_name_or_path", "task_type"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise ValueError(f"{name} must be a string, got {_shown(raw[name])}")

    served = [module_path(layer, m) for layer in range(arch.num_layers) for m in TARGET_MODULES]
    targets = _target_modules(raw["target_modules"], served)
    exclude = _selector("exclude_modules", raw.get("exclude_modules"), allow_empty=True)
    layers = _layers(raw.get("layers_to_transform"), arch.num_layers)
    _layers_pattern(raw.get("layers_pattern"), layers is not None and targets.regex is None)
    rank_pattern, rank_values = _pattern_field(raw, "rank_pattern", lambda f, v: _rank(f, v, max_rank))
    alpha_pattern, alpha_values = _pattern_field(raw, "alpha_pattern", _alpha)
    selection = f"target_modules={_shown(raw['target_modules'])}"
    for name in ("layers_to_transform", "exclude_modules"):
        if raw.get(name) not in (None, [], ""):
            selection += f", {name}={_shown(raw[name])}"
    return LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets, exclude_modules=exclude,
        layers_to_transform=layers, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        rank_values=rank_values, alpha_values=alpha_values,
        base_model_name_or_path=str(raw.get("base_model_name_or_path") or "") or None,
        selection=selection,
    )


def _rank(name: str, value: object, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {_shown(value)}")
    if value > max_rank:
        raise ValueError(f"{name}={value} is above max_lora_rank={max_rank}")
    return value


def _alpha(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {_shown(value)}")
    return float(value)


def _flag(raw: Mapping[str, object], name: str) -> bool:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_shown(value)}")
    return bool(value)


def _selector(name: str, value: object, *, allow_empty: bool) -> ModuleSelector:
    if value is None or (allow_empty and value in ("", [])):
        return ModuleSelector()
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be empty")
        regex, _ = compile_pattern(name, value, peft_key=False)
        return ModuleSelector(regex=regex)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a module name, a list of module names or a regex string, "
                         f"got {_shown(value)}")
    if len(value) > MAX_PATTERN_KEYS:
        raise ValueError(f"{name} lists {len(value)} modules; at most {MAX_PATTERN_KEYS}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{name} entries must be non-empty strings, got {_shown(bad[0])}")
    return ModuleSelector(names=tuple(value))


def _target_modules(value: object, served: Sequence[str]) -> ModuleSelector:
    allowed = ", ".join(TARGET_MODULES)
    if isinstance(value, str) and value.lower() == "all-linear":  # PEFT: every linear layer but the output
        return ModuleSelector(names=TARGET_MODULES)
    selector = _selector("target_modules", value, allow_empty=False)
    if selector.regex is not None:
        unserved = [m for m in UNSERVED_MODULES if selector.regex.fullmatch(m)]
        if unserved:
            raise ValueError(f"target_modules={_shown(value)} selects {unserved[0]!r}, which this engine does not "
                             f"apply LoRA to; allowed: {allowed}")
        if not any(selector.regex.fullmatch(path) for path in served):
            raise ValueError(f"target_modules={_shown(value)} selects none of the modules this engine serves; "
                             f"allowed: {allowed}")
        return selector
    for name in selector.names:
        if not any(path == name or path.endswith("." + name) for path in served):
            raise ValueError(f"target_modules: {name!r} is not a module this engine applies LoRA to; "
                             f"allowed: {allowed}")
    return selector


def _layers(value: object, num_layers: int) -> frozenset[int] | None:
    if value is None or value == []:
        return None  # PEFT: no restriction
    items = [value] if _is_int(value) else value
    if not isinstance(items, list) or not all(_is_int(v) for v in items):
        raise ValueError(f"layers_to_transform must be a layer index or a list of layer indices, got {_shown(value)}")
    bad = [v for v in items if not 0 <= v < num_layers]
    if bad:
        raise ValueError(f"layers_to_transform holds layer {bad[0]}, but the base model has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    return frozenset(items)


def _layers_pattern(value: object, used: bool) -> None:
    if value is None or value in ("", []):
        return
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(v, str) for v in names):
        raise ValueError(f"layers_pattern must be a string or a list of strings, got {_shown(value)}")
    if used and "layers" not in names:
        raise ValueError(f"layers_pattern={_shown(value)} does not name this model's layer list ('layers')")


def _pattern_field(
    raw: Mapping[str, object], name: str, check: Callable[[str, object], T]
) -> tuple[PatternTable, dict[str, T]]:
    value = raw.get(name)
    if value is None:
        return (), {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object mapping module-name patterns to values, got {_shown(value)}")
    table = pattern_table(name, value)
    values = {key: check(f"{name}[{key!r}]", v) for key, v in value.items()}
    return table, values


# ---- the served base model's identity -------------------------------------------------------------
def served_base_names(model: str, model_dir: Path | None = None) -> tuple[str, ...]:
    """Names the served base goes by: the configured model (path or Hub id), its directory, and the
    original name its config.json records (`_name_or_path`, e.g. the Hub id a converted model came from)."""
    names = [model]
    if model_dir is not None:
        names.append(str(model_dir))
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        for key in ("_name_or_path", "_model_name_or_path"):
            if isinstance(config, dict) and isinstance(config.get(key), str) and config[key]:
                names.append(config[key])
    return tuple(dict.fromkeys(n for n in names if n))


def _name_key(name: str) -> str:
    # Lenient: the last path component (a Hub id's repo name, a directory's name), case-insensitive.
    return re.split(r"[/\\]", name.strip().rstrip("/\\"))[-1].lower()


def base_model_mismatch(adapter_base: str | None, served: Sequence[str]) -> bool:
    """True when the adapter names a base model that is none of the served base's names."""
    if not adapter_base or not served:
        return False
    return _name_key(adapter_base) not in {_name_key(s) for s in served}
