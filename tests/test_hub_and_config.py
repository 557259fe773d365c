"""Model loading from a local directory laid out like the Hub cache, offline; config parsing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
from engine.hub import resolve_local_dir
from tests.helpers import TinyFamily


def hub_layout(cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Place `source`'s files where huggingface_hub's cache keeps a snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_model_and_adapter_by_hub_id_offline(families: dict[str, TinyFamily], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fam = families["llama"]
    cache = tmp_path / "hub"
    hub_layout(cache, "tiny-org/tiny-llama", fam.base)
    hub_layout(cache, "tiny-org/tiny-lora", fam.adapters["qv-r4"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_local_dir("tiny-org/tiny-llama", cache_dir=str(cache)).is_dir()
    engine = Engine(
        EngineConfig(model="tiny-org/tiny-llama", hub_cache_dir=str(cache), adapters=(AdapterSpec.parse("lora=tiny-org/tiny-lora"),))
    )
    try:
        local = Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("lora", str(fam.adapters["qv-r4"])),)))
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        a = asyncio.run(engine.complete("hello hub", params, "lora"))
        b = asyncio.run(local.complete("hello hub", params, "lora"))
        assert a.token_ids == b.token_ids
        local.shutdown()
    finally:
        engine.shutdown()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_local_dir("tiny-org/not-there", cache_dir=str(cache))


def test_adapter_spec_parsing() -> None:
    specs = AdapterSpec.parse_list("a=/models/a, org/b ,c=org/c")
    assert [(s.adapter_id, s.source) for s in specs] == [("a", "/models/a"), ("org/b", "org/b"), ("c", "org/c")]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="int3").validate()
    with pytest.raises(ValueError, match="unique"):
        EngineConfig(model="x", adapters=(AdapterSpec("a", "p"), AdapterSpec("a", "q"))).validate()
