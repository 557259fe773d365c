"""The demo model: a small random-init Llama and eight LoRA adapters of different ranks and target modules.

Built once into the cache root (models/cache.py) with `models.synthetic`; the tests, the load tests
and `model: demo` use it because it is fast and every adapter visibly changes the output, so a
request routed to the wrong adapter shows. From the command line it generates in one mixed batch:

    python -m models.demo                                  # the base and all eight adapters, two prompts
    python -m models.demo --prompt "Hello" --max-new-tokens 32

(the arguments are those of `python -m engine`, which this runs on the demo model).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from engine import AdapterSpec
from models.cache import cache_root, file_lock

# Bump when the recipe below changes: a new directory is built instead of reusing a stale one.
DEMO_VERSION = 1
DEMO_NAME = "demo"

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
    from models.synthetic import build_adapter, build_model

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
    with file_lock(root / f".{final.name}.lock"):
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


def main(argv: list[str] | None = None) -> None:
    """`python -m engine` on the demo model with all its adapters (extra arguments pass through)."""
    from engine.__main__ import main as engine_main

    directory = build_demo()
    adapters = [f"--adapter={spec.adapter_id}={spec.source}" for spec in demo_adapter_specs(directory)]
    engine_main(["--model", str(directory / "base"), *adapters, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
