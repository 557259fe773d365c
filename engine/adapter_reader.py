"""Reading one adapter from its source (a local directory or a Hub repo) into host memory.

Confined reads (engine/adapter_source.py): an adapter registered from a Hub id is read only from
that repo's folder in the Hub cache, one under an `adapter_source_roots` root only from under that
root, every file resolved again at every read. Validation is engine/adapters.py's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.adapter_weights import BIN_FILE, SAFETENSORS_FILE, WEIGHT_FILES
from engine.adapters import CONFIG_FILE, LoraAdapter, LoraModuleWeights, load_peft_adapter
from engine.config import AdapterSpec
from engine.errors import AdapterLoadError
from engine.hub import hub_repo_dir, resolve_local_dir
from engine.model_arch import ModelArch

ADAPTER_FILE_PATTERNS = [CONFIG_FILE, SAFETENSORS_FILE, "*.md"]


def read_adapter(
    spec: AdapterSpec, *, from_hub: bool, allowed_root: Path | None, arch: ModelArch, max_rank: int,
    dtype: torch.dtype, device: str, hub_cache_dir: str | None,
) -> LoraAdapter:
    """Read, check and convert `spec`'s adapter; raises AdapterLoadError naming what is wrong."""
    try:
        directory = resolve_local_dir(spec.source, spec.revision, hub_cache_dir, ADAPTER_FILE_PATTERNS)
        if from_hub and not any((Path(directory) / name).exists() for name in WEIGHT_FILES):
            # A repo without safetensors weights: fetch PEFT's older adapter_model.bin, and only
            # then (as PEFT does), from the same commit (the snapshot folder's name).
            directory = resolve_local_dir(spec.source, Path(directory).name, hub_cache_dir, [BIN_FILE])
    except FileNotFoundError as exc:
        raise AdapterLoadError(spec.adapter_id, str(exc)) from exc
    root = hub_repo_dir(spec.source, hub_cache_dir) if from_hub else allowed_root
    adapter = load_peft_adapter(spec.adapter_id, Path(directory), arch, max_rank, dtype, spec.source, allowed_root=root)
    if device.startswith("cuda"):
        # Page-locked host copies make the later host-to-device copy asynchronous and fast.
        adapter = _pin_memory(adapter)
    return adapter


def _pin_memory(adapter: LoraAdapter) -> LoraAdapter:
    pinned = {
        key: LoraModuleWeights(w.lora_a.pin_memory(), w.lora_b.pin_memory(), w.scaling) for key, w in adapter.weights.items()
    }
    return replace(adapter, weights=pinned)
