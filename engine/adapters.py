"""PEFT LoRA adapters: read `adapter_config.json` + the weights, validate against the base.

The weights are `adapter_model.safetensors`, or where a directory has none PEFT's older
`adapter_model.bin` (read without running its pickle: engine/adapter_weights.py). Keys are
mapped as saved by every PEFT version: with or without the leading `base_model.model.`, with or
without an adapter name before `.weight` (`lora_A.default.weight`, `lora_A.<adapter_name>.weight`:
a PEFT model's own state_dict() keys, as some older tools saved them). Trained copies of lm_head / embed_tokens (modules_to_save,
save_embedding_layers) and embedding LoRA are refused naming the module: the engine applies LoRA
to the projections only.

Weights are checked when they are read (every read), one reduction per tensor (max |w|, which is
NaN or Inf when any value is):
- dtype float16, bfloat16, float32 or float64 (int8 & co. are quantized or not LoRA weights);
- shapes the base expects: lora_A [r, in_features], lora_B [out_features, r] for the module named,
  r the rank adapter_config.json gives that module (r, or its rank_pattern entry);
- every value finite, and |w| <= MAX_ABS_WEIGHT (1e4) for lora_A and for lora_B x scaling (the
  delta that is actually added). Trained LoRA weights are far below 1 (B starts at zero); 1e4 is
  below float16's largest value (65504), so every weight that passes is also finite after the
  cast to any serving dtype. What exceeds it is corrupt or adversarial (1e30 gives Inf
  activations in float32 too) and is refused naming the layer and module. It is a sanity bound,
  not a proof that no activation can overflow.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.adapter_config import ATTENTION_MODULES, MAX_CONFIG_BYTES, UNSERVED_MODULES, parse_adapter_config
from engine.adapter_source import read_under
from engine.adapter_weights import BIN_FILE, SAFETENSORS_FILE, decode_weights
from engine.errors import AdapterLoadError
from engine.model import TARGET_MODULES
from engine.model_arch import ModelArch

CONFIG_FILE = "adapter_config.json"
MAX_ABS_WEIGHT = 1e4
_Fail = Callable[[str], AdapterLoadError]
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# PEFT's saved keys: "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (an adapter
# name may sit before ".weight"); older saves drop the leading "base_model.model." or "model.".
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# Weights of modules the engine does not apply LoRA to ("...lm_head.weight", "...embed_tokens.lora_embedding_A").
_UNSERVED_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?:model\.)?({'|'.join(m.rsplit('.', 1)[-1] for m in UNSERVED_MODULES)})\.(.+)$"
)


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
    # sha256 of what it computes with (weights_digest()): the prefix cache shares K/V only between
    # sequences of the same adapter id and digest, so a reload with other weights never reuses blocks.
    weights_digest: str = ""

    @property
    def nbytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for w in self.weights.values())


def weights_digest(weights: dict[tuple[int, str], LoraModuleWeights]) -> str:
    """sha256 over every module's position, scaling, dtype, shapes and tensor bytes, in (layer, module) order.

    Taken from the validated tensors as served (cast to the serving dtype), so it names exactly the
    deltas applied: equal digests compute equal K/V, whichever file format they were read from.
    """
    digest = hashlib.sha256()
    for (layer, module), w in sorted(weights.items()):
        digest.update(f"{layer}.{module}:{w.scaling!r}:".encode())
        for tensor in (w.lora_a, w.lora_b):
            flat = tensor.detach().cpu().contiguous()
            digest.update(f"{flat.dtype}{list(flat.shape)}".encode())
            digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def max_weights_bytes(arch: ModelArch, max_rank: int) -> int:
    """The largest weight file this base can take: every module at max_rank in float64, plus per-tensor
    overhead (a safetensors header entry, or a .bin's zip entry and pickle record)."""
    per_layer = sum(i + o for i, o in arch.module_shapes().values())
    tensors = 2 * len(TARGET_MODULES) * arch.num_layers
    return 8 * max_rank * per_layer * arch.num_layers + 1024 * tensors + (1 << 20)  # + the JSON header


def _read(directory: Path, name: str, allowed_root: Path | None, limit: int, fail: _Fail, *, missing: str) -> bytes:
    """The file's bytes through read_under; `missing` is the refusal when it does not exist."""
    try:
        return read_under(directory / name, allowed_root, limit)
    except FileNotFoundError as exc:
        raise fail(missing) from exc
    except (PermissionError, ValueError) as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"{name} cannot be read: {exc.strerror or exc}") from exc


def _read_weights(
    directory: Path, allowed_root: Path | None, limit: int, fail: _Fail
) -> tuple[str, dict[str, torch.Tensor]]:
    """PEFT's choice: adapter_model.safetensors when it exists, else adapter_model.bin; the same confined,
    size-capped read for both."""
    name = SAFETENSORS_FILE if (directory / SAFETENSORS_FILE).exists() else BIN_FILE
    data = _read(directory, name, allowed_root, limit, fail,
                 missing=f"{SAFETENSORS_FILE} not found (nor {BIN_FILE}; is this a PEFT adapter directory?)")
    try:
        return name, decode_weights(name, data)
    except ValueError as exc:
        raise fail(str(exc)) from exc


def _not_served(key: str) -> str | None:
    """Why tensor `key` is for a module the engine does not apply LoRA to, naming it; None for other keys."""
    match = _UNSERVED_KEY.match(key)
    if match is None:
        return None
    module, rest = match.group(1), match.group(2)
    if rest.startswith("lora_embedding_"):
        return f"embedding LoRA on {module}, which this engine does not serve"
    if rest.startswith("lora_"):
        return f"LoRA on {module}, which this engine does not serve"
    return (f"a trained copy of {module}'s own weights (modules_to_save, or save_embedding_layers after a vocabulary "
            f"resize), which this engine does not serve")


def _owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A compact copy in `dtype`: a tensor from a .bin can be a view of a larger stored buffer, which
    must not stay alive behind it (host-cache accounting counts the tensor's own bytes)."""
    out = tensor.to(dtype).contiguous()
    return out.clone() if out.untyped_storage().nbytes() > out.nbytes else out


def _peak(tensor: torch.Tensor, what: str, fail: _Fail) -> float:
    """max |w|, refusing non-floating dtypes and non-finite or oversized values (one reduction)."""
    if tensor.dtype not in WEIGHT_DTYPES:
        raise fail(f"{what} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA weights must be "
                   f"float16, bfloat16, float32 or float64")
    peak = float(tensor.abs().max())  # NaN anywhere makes the max NaN, Inf makes it Inf
    if not math.isfinite(peak):
        raise fail(f"{what} holds non-finite values (NaN/Inf)")
    if peak > MAX_ABS_WEIGHT:
        raise fail(f"{what} holds values up to {peak:.3g}, above the bound |w| <= {MAX_ABS_WEIGHT:g}")
    return peak


def load_peft_adapter(
    adapter_id: str,
    directory: Path,
    arch: ModelArch,
    max_rank: int,
    dtype: torch.dtype,
    source: str | None = None,
    *,
    allowed_root: Path | None = None,
) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter. Every refusal names the field, layer or module at fault.

    Each file is resolved when it is read and must lie under `allowed_root` (None: the operator's
    own adapters, not confined).
    """

    def fail(message: str) -> AdapterLoadError:
        return AdapterLoadError(adapter_id, message)

    config_bytes = _read(directory, CONFIG_FILE, allowed_root, MAX_CONFIG_BYTES, fail,
                         missing=f"{CONFIG_FILE} not found (is this a PEFT adapter directory?)")
    config = parse_adapter_config(adapter_id, config_bytes, arch, max_rank)
    weights_file, tensors = _read_weights(directory, allowed_root, max_weights_bytes(arch, max_rank), fail)

    pieces: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in sorted(tensors.items()):  # sorted: the same file gives the same first complaint
        match = _KEY.match(key)
        if match is None:
            why = _not_served(key)
            raise fail(f"tensor {key!r} is not a LoRA A/B weight of a served module ({', '.join(TARGET_MODULES)})"
                       + (f": it is {why}" if why else ""))
        layer, block, module, which = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        if module not in TARGET_MODULES:
            raise fail(f"tensor {key!r}: module {module!r} is not served; allowed: {', '.join(TARGET_MODULES)}")
        if block != ("self_attn" if module in ATTENTION_MODULES else "mlp"):
            raise fail(f"tensor {key!r}: {module} is not part of {block}")
        if layer >= arch.num_layers:
            raise fail(f"tensor {key!r} is for layer {layer}, but the base model has {arch.num_layers} layers "
                       f"(0..{arch.num_layers - 1})")
        if not config.selects(layer, module):
            raise fail(f"tensor {key!r}: layer {layer} {module} is not selected by adapter_config.json "
                       f"({config.selection})")
        ab = pieces.setdefault((layer, module), {})
        if which in ab:
            raise fail(f"tensors {ab[which][0]!r} and {key!r} are both layer {layer} {module} lora_{which}")
        ab[which] = (key, tensor)
    if not pieces:
        raise fail(f"{weights_file} holds no LoRA weights")

    shapes = arch.module_shapes()
    weights: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, module), ab in sorted(pieces.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            have, missing = ("A", "B") if "A" in ab else ("B", "A")
            raise fail(f"{where}: has lora_{have} but no lora_{missing}")
        a, b = ab["A"][1], ab["B"][1]
        in_features, out_features = shapes[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape[0] != out_features or b.shape[1] != a.shape[0]:
            raise fail(
                f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base "
                f"(expects lora_A [r, {in_features}] and lora_B [{out_features}, r]); wrong base model?"
            )
        rank, expected = a.shape[0], config.rank_of(layer, module)
        if rank != expected:
            raise fail(f"{where}: lora_A / lora_B have rank {rank}, but adapter_config.json gives this module "
                       f"r={expected} (r / rank_pattern)")
        _peak(a, f"{where} lora_A", fail)
        peak_b = _peak(b, f"{where} lora_B", fail)
        scaling = config.scaling_of(layer, module)
        if peak_b * scaling > MAX_ABS_WEIGHT:
            raise fail(f"{where}: lora_B x scaling ({scaling:.3g}, from lora_alpha / r) reaches {peak_b * scaling:.3g}, "
                       f"above the bound {MAX_ABS_WEIGHT:g}")
        weights[(layer, module)] = LoraModuleWeights(_owned(a, dtype), _owned(b, dtype), scaling)

    return LoraAdapter(
        adapter_id=adapter_id,
        source=source or str(directory),
        rank=max(w.lora_a.shape[0] for w in weights.values()),
        targets=tuple(m for m in TARGET_MODULES if any(mod == m for _, mod in weights)),
        weights=weights,
        base_model=config.base_model_name_or_path,
        weights_digest=weights_digest(weights),
    )
