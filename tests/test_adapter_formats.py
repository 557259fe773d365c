"""Adapter files as found on the Hub (issue 16): PEFT's older `adapter_model.bin`, key spellings of every
PEFT version, and adapters that train lm_head / embed_tokens.

A `.bin` saved by PEFT itself loads and the engine's greedy tokens equal PEFT's; it gives the same
tensors as the `.safetensors` of the same weights; a pickle that would run code is refused naming
the file and nothing runs; a `.bin` that is not a flat dict of dense tensors is refused;
modules_to_save and embedding LoRA are refused naming the module.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from engine import AdapterLoadError, AdapterSpec, Engine, EngineConfig
from engine.adapters import LoraAdapter, load_peft_adapter
from engine.model_arch import ModelArch
from models.synthetic import build_model
from tests.helpers import PeftOracle, TinyFamily, random_prompts, run_requests

BIN = "adapter_model.bin"
SAFETENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
NEW_TOKENS = 8


def _peft_model(base: Path, **lora: Any) -> Any:
    """A PEFT LoRA model on `base` with random (non-zero) A and B, as PEFT builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    options.update(lora)
    return get_peft_model(model, LoraConfig(**options))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and one PEFT adapter saved twice by PEFT: as adapter_model.bin and as safetensors."""
    root = tmp_path_factory.mktemp("formats")
    base = build_model(root / "base", "llama", seed=1, init_std=0.08)
    model = _peft_model(base)
    model.save_pretrained(str(root / "bin"), safe_serialization=False)
    model.save_pretrained(str(root / "safetensors"), safe_serialization=True)
    return {"root": root, "base": base, "bin": root / "bin", "safetensors": root / "safetensors"}


def _arch(base: Path) -> ModelArch:
    from transformers import AutoConfig

    return ModelArch.from_hf_config(AutoConfig.from_pretrained(str(base)))


def _load(saved: dict[str, Path], directory: Path, adapter_id: str = "a") -> LoraAdapter:
    return load_peft_adapter(adapter_id, directory, _arch(saved["base"]), 16, torch.float32)


def _assert_same_weights(got: LoraAdapter, expected: LoraAdapter) -> None:
    assert got.weights.keys() == expected.weights.keys() and got.rank == expected.rank
    assert got.targets == expected.targets
    for where, w in expected.weights.items():
        assert torch.equal(got.weights[where].lora_a, w.lora_a), where
        assert torch.equal(got.weights[where].lora_b, w.lora_b), where
        assert got.weights[where].scaling == w.scaling, where


def _variant(saved: dict[str, Path], name: str, tensors: dict[str, Any] | bytes) -> Path:
    """A copy of the PEFT-saved .bin adapter whose adapter_model.bin is replaced (by a state dict or raw bytes)."""
    directory = saved["root"] / "variants" / name
    shutil.copytree(saved["bin"], directory)
    if isinstance(tensors, bytes):
        (directory / BIN).write_bytes(tensors)
    else:
        torch.save(tensors, directory / BIN)
    return directory


def _peft_state(saved: dict[str, Path]) -> dict[str, torch.Tensor]:
    return torch.load(saved["bin"] / BIN, weights_only=True)


# ---- a .bin saved by PEFT serves exactly as PEFT ---------------------------------------------------
def test_peft_saved_bin_adapter_tokens_equal_peft(saved: dict[str, Path]) -> None:
    assert (saved["bin"] / BIN).is_file() and not (saved["bin"] / SAFETENSORS).exists()
    family = TinyFamily("llama", saved["base"], {"bin": saved["bin"]})
    oracle = PeftOracle(family)  # PEFT reads the same adapter_model.bin
    engine = Engine(EngineConfig(model=str(saved["base"]), adapters=family.specs(), max_lora_rank=16,
                                 num_kv_blocks=64))
    try:
        prompts = random_prompts(3, seed=11, min_words=4, max_words=12)
        requests = [(p, a) for p in prompts for a in ("bin", None)]
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS))  # adapter and base in one batch
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS), (adapter, prompt)
        assert any(got[i] != got[i + 1] for i in range(0, len(got), 2))  # the adapter changes the output
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_bin_and_safetensors_of_the_same_weights_give_identical_tensors(saved: dict[str, Path]) -> None:
    from_bin, from_safetensors = _load(saved, saved["bin"]), _load(saved, saved["safetensors"])
    _assert_same_weights(from_bin, from_safetensors)
    assert from_bin.targets == ("q_proj", "v_proj", "down_proj") and len(from_bin.weights) == 6
    assert all(not w.lora_a.requires_grad for w in from_bin.weights.values())


def test_safetensors_is_preferred_when_both_files_exist(saved: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    both = _variant(saved, "both", pickle.dumps(_RunsCode(f"touch {marker}")))  # a .bin that would run code ...
    shutil.copy(saved["safetensors"] / SAFETENSORS, both / SAFETENSORS)
    _assert_same_weights(_load(saved, both), _load(saved, saved["safetensors"]))  # ... is never read
    assert not marker.exists()
    # As in PEFT, a broken safetensors file is an error: no silent fall back to the .bin next to it.
    broken = _variant(saved, "broken-safetensors", _peft_state(saved))
    (broken / SAFETENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        _load(saved, broken)


# ---- key spellings of every PEFT version -----------------------------------------------------------
def _respelled(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {key.replace(old, new): value for key, value in state.items()}


@pytest.mark.parametrize(("case", "respell"), [
    ("default-adapter-name", lambda s: _respelled(s, ".weight", ".default.weight")),
    ("named-adapter", lambda s: _respelled(s, ".weight", ".my-task_2.weight")),
    ("no-base-model-prefix", lambda s: _respelled(s, "base_model.model.", "")),
    ("bare-layers", lambda s: _respelled(s, "base_model.model.model.", "")),
    ("prefix-and-name", lambda s: _respelled(_respelled(s, "base_model.model.", ""), ".weight", ".default.weight")),
    ("parameters", lambda s: {k: torch.nn.Parameter(v) for k, v in s.items()}),
])
def test_key_spellings_map_to_the_same_weights(
    saved: dict[str, Path], case: str, respell: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    state = respell(_peft_state(saved))
    assert state.keys() != _peft_state(saved).keys() or case == "parameters"
    expected = _load(saved, saved["bin"])
    _assert_same_weights(_load(saved, _variant(saved, f"bin-{case}", state)), expected)
    as_safetensors = saved["root"] / "variants" / f"st-{case}"  # the same keys in a safetensors file
    shutil.copytree(saved["safetensors"], as_safetensors, dirs_exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(as_safetensors / SAFETENSORS))
    _assert_same_weights(_load(saved, as_safetensors), expected)


def test_two_spellings_of_one_weight_are_refused(saved: dict[str, Path]) -> None:
    state = _peft_state(saved)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key.replace(".weight", ".default.weight")] = state[key].clone()
    with pytest.raises(AdapterLoadError, match=r"tensors '.*q_proj.lora_A.default.weight' and '.*q_proj.lora_A.weight' "
                                               r"are both layer 0 q_proj lora_A"):
        _load(saved, _variant(saved, "two-spellings", state))


# ---- a .bin is read as weights, never run ----------------------------------------------------------
class _RunsCode:
    """Unpickling this calls os.system(command): what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class _Evals:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (self.code,))


def _torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["zip-os-system", "zip-eval-beside-real-weights", "bare-pickle"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(
    saved: dict[str, Path], tmp_path: Path, case: str
) -> None:
    marker = tmp_path / "ran"
    if case == "zip-os-system":  # a torch.save checkpoint, as a real malicious .bin is
        data, needle = _torch_saved({"w": _RunsCode(f"touch {marker}")}), r"refers to (posix|os)\.system"
    elif case == "zip-eval-beside-real-weights":
        state: dict[str, Any] = dict(_peft_state(saved))
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = _Evals(
            f"open({str(marker)!r}, 'w')")
        data, needle = _torch_saved(state), r"refers to (builtins\.)?eval,"
    else:
        data, needle = pickle.dumps({"w": _RunsCode(f"touch {marker}")}), r"adapter_model.bin is not a PyTorch checkpoint"
    directory = _variant(saved, f"evil-{case}", data)
    with pytest.raises(AdapterLoadError, match=needle) as refused:
        _load(saved, directory, adapter_id="evil")
    assert refused.value.adapter_id == "evil" and BIN in str(refused.value)
    assert "weights_only=False" not in str(refused.value)  # torch's advice to disable the guard is not passed on
    assert not marker.exists()


def test_engine_refuses_a_malicious_bin_and_keeps_serving(saved: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = _variant(saved, "evil-engine", _torch_saved({"w": _RunsCode(f"touch {marker}")}))
    engine = Engine(EngineConfig(model=str(saved["base"]), adapters=(AdapterSpec("good", str(saved["bin"])),),
                                 max_lora_rank=16, num_kv_blocks=64, allow_dynamic_adapters=True,
                                 adapter_source_roots=(str(saved["root"]),), adapter_failure_ttl_s=0.0))
    try:
        with pytest.raises(AdapterLoadError, match=r"adapter_model.bin is refused: its pickle refers to"):
            engine.load_adapter(AdapterSpec("evil", str(evil)))
        with pytest.raises(AdapterLoadError, match=r"nothing in it was run"):  # dynamic load, background path
            asyncio.run(run_requests(engine, [("x y", str(evil))], 2))
        assert asyncio.run(run_requests(engine, [("x y", "good")], 2))[0]  # the next good request is served
        assert not {"evil", str(evil)} & set([a["id"] for a in engine.adapter_info()]) and not marker.exists()
    finally:
        engine.shutdown()


# ---- a .bin that is not a flat dict of dense tensors -----------------------------------------------
def _recompressed(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    return out.getvalue()


def _legacy(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _no_pickle() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data/0", b"\x00" * 16)
    return out.getvalue()


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_BINS: list[tuple[str, Callable[[dict[str, torch.Tensor]], bytes], str]] = [
    ("a-list", lambda s: _torch_saved(list(s.values())), r"adapter_model.bin must hold a dict of tensor names to "
                                                        r"tensors \(a state dict\), got list"),
    ("a-tensor", lambda s: _torch_saved(s[KEY_A]), r"must hold a dict .*, got Tensor"),
    ("nested-state-dict", lambda s: _torch_saved({"state_dict": s}),
     r"adapter_model.bin: 'state_dict' holds a value of type dict, not a tensor"),
    ("int-value", lambda s: _torch_saved({**s, KEY_A: 3}), rf"adapter_model.bin: '{KEY_A}' holds a value of type int"),
    ("string-value", lambda s: _torch_saved({**s, "note": "hello"}), r"'note' holds a value of type str, not a tensor"),
    ("int-key", lambda s: _torch_saved({0: s[KEY_A]}), r"adapter_model.bin: key 0 is not a string"),
    ("sparse-tensor", lambda s: _torch_saved({**s, KEY_A: s[KEY_A].to_sparse()}),
     rf"'{KEY_A}' is not a dense tensor \(Tensor, layout sparse_coo"),
    ("int8-tensor", lambda s: _torch_saved({**s, KEY_A: s[KEY_A].to(torch.int8)}),
     r"layer 0 q_proj lora_A has dtype int8; LoRA weights must be"),
    ("nan", lambda s: _torch_saved({**s, KEY_A: s[KEY_A] * float("nan")}),
     r"layer 0 q_proj lora_A holds non-finite values"),
    ("wrong-shape", lambda s: _torch_saved({**s, KEY_A: s[KEY_A][:, :-1]}), r"layer 0 q_proj: lora_A \[4, 63\]"),
    ("empty-dict", lambda s: _torch_saved({}), r"adapter_model.bin holds no LoRA weights"),
    ("compressed-zip", lambda s: _recompressed(_torch_saved(s)), r"adapter_model.bin: entry '.*' is compressed"),
    ("legacy-format", lambda s: _legacy(s), r"adapter_model.bin is not a PyTorch checkpoint \(the zip archive"),
    ("zip-without-pickle", lambda s: _no_pickle(), r"adapter_model.bin is a zip archive but not a PyTorch checkpoint"),
    ("truncated", lambda s: _torch_saved(s)[:-200], r"adapter_model.bin is not a (readable )?PyTorch checkpoint"),
    ("empty-file", lambda s: b"", r"adapter_model.bin is not a PyTorch checkpoint"),
]


@pytest.mark.parametrize(("case", "make", "needle"), BAD_BINS, ids=[c[0] for c in BAD_BINS])
def test_bin_that_is_not_a_flat_dict_of_dense_tensors_is_refused(
    saved: dict[str, Path], case: str, make: Callable[[dict[str, torch.Tensor]], bytes], needle: str
) -> None:
    directory = _variant(saved, f"bad-{case}", make(_peft_state(saved)))
    with pytest.raises(AdapterLoadError, match=needle):
        _load(saved, directory)


def test_bin_goes_through_the_size_cap_and_the_root(saved: dict[str, Path], tmp_path: Path) -> None:
    from engine.adapters import max_weights_bytes

    arch = _arch(saved["base"])
    huge = _variant(saved, "huge", b"\x00" * (max_weights_bytes(arch, 16) + 1))
    with pytest.raises(AdapterLoadError, match=r"adapter_model.bin is \d+ bytes, more than the \d+ bytes allowed"):
        _load(saved, huge)
    allowed = tmp_path / "allowed"
    (allowed / "linked").mkdir(parents=True)
    shutil.copy(saved["bin"] / CONFIG, allowed / "linked" / CONFIG)
    (allowed / "linked" / BIN).symlink_to(saved["bin"] / BIN)  # the weights lie outside the root
    with pytest.raises(AdapterLoadError, match=r"adapter_model.bin resolves outside the allowed root"):
        load_peft_adapter("linked", allowed / "linked", arch, 16, torch.float32, allowed_root=allowed.resolve())


# ---- adapters that train lm_head / embed_tokens ------------------------------------------------------
@pytest.fixture(scope="module")
def trains_more(saved: dict[str, Path]) -> dict[str, Path]:
    """PEFT-saved .bin adapters with modules_to_save=["lm_head"], and with LoRA on embed_tokens."""
    root = saved["root"] / "more"
    _peft_model(saved["base"], target_modules=["q_proj"], modules_to_save=["lm_head"]).save_pretrained(
        str(root / "modules-to-save"), safe_serialization=False)
    embedding = _peft_model(saved["base"], target_modules=["q_proj", "embed_tokens"])
    embedding.save_pretrained(str(root / "embedding-lora"), safe_serialization=False, save_embedding_layers=False)
    embedding.save_pretrained(str(root / "embedding-lora-saved-layers"), safe_serialization=False)
    return {p.name: p for p in root.iterdir()}


def _edit_config(directory: Path, **changes: Any) -> Path:
    edited = directory.with_name(directory.name + "-edited")
    shutil.copytree(directory, edited)
    config = json.loads((edited / CONFIG).read_text())
    config.update(changes)
    (edited / CONFIG).write_text(json.dumps(config))
    return edited


@pytest.mark.parametrize(("name", "changes", "needle"), [
    ("modules-to-save", {}, r"modules_to_save=\['lm_head'\] is not supported \(fully trained copies"),
    # The config's field cleared, the weights still there: refused by the tensor, naming the module.
    ("modules-to-save", {"modules_to_save": None},
     r"tensor 'base_model.model.lm_head.weight' .*: it is a trained copy of lm_head's own weights"),
    ("embedding-lora", {}, r"target_modules: 'embed_tokens' is not a module this engine applies LoRA to"),
    ("embedding-lora", {"target_modules": ["q_proj"]},
     r"tensor 'base_model.model.model.embed_tokens.lora_embedding_A' .*: it is embedding LoRA on embed_tokens"),
    ("embedding-lora-saved-layers", {"target_modules": ["q_proj"]},
     r"tensor 'base_model.model.model.embed_tokens.base_layer.weight' .*: it is a trained copy of embed_tokens's"),
], ids=["modules-to-save", "modules-to-save-weights", "embedding-lora", "embedding-lora-weights",
        "embedding-layers-saved"])
def test_adapters_that_train_lm_head_or_embed_tokens_are_refused_naming_the_module(
    trains_more: dict[str, Path], saved: dict[str, Path], name: str, changes: dict[str, Any], needle: str
) -> None:
    directory = _edit_config(trains_more[name], **changes) if changes else trains_more[name]
    with pytest.raises(AdapterLoadError, match=needle):
        _load(saved, directory)
