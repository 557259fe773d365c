"""Adapter files are validated at load (issue 11): config fields, weights, where files live, timeouts.

A table of malformed adapter directories, each refused with an AdapterLoadError that names the
field, layer or module at fault, none hanging, and the engine serving the next good request; reads
confined to the allowed root (symlinks included, checked at every read); the Hub cache layout
(snapshot files are links into blobs/); a mismatched base_model_name_or_path reported; a hung load
failing its requests at the deadline without starving other adapters' loads.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.adapter_reader as adapter_reader
from engine import AdapterLoadError, AdapterSpec, Engine, EngineConfig, SamplingParams
from engine.adapter_source import check_source
from engine.peft_patterns import matches_key
from models.synthetic import build_adapter, build_model

GOOD = "good"
PARAMS = SamplingParams(max_new_tokens=3, ignore_eos=True)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer synthetic Llama and a rank-4 q/v adapter (r=4, alpha=8) to derive the bad ones from."""
    root = tmp_path_factory.mktemp("validation")
    base = build_model(root / "base", "llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, vocab_size=300)
    good = build_adapter(root / "adapters" / GOOD, base, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=3)
    return {"root": root, "base": base, "good": good}


def _copy(good: Path, dst: Path) -> Path:
    shutil.copytree(good, dst)
    return dst


def config_change(**changes: Any) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        (d / CONFIG).write_text(json.dumps(config))
    return apply


_DROP = object()


def raw_config(data: bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / CONFIG).write_bytes(data)
    return apply


def tensor_change(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(str(d / WEIGHTS))
        fn(tensors)
        save_file(tensors, str(d / WEIGHTS))
    return apply


def key(layer: int, module: str, which: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = make(tensors[name])
    return fn


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _huge(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[-1, -1] = 1e30
    return t


def _add_key(name: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(shape)
    return fn


def _drop_key(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]
    return fn


def _all_int8(tensors: dict[str, torch.Tensor]) -> None:
    for name in list(tensors):
        tensors[name] = (tensors[name] * 100).to(torch.int8)


def _remove(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).unlink()
    return apply


def _fifo_config(d: Path) -> None:
    (d / CONFIG).unlink()
    os.mkfifo(d / CONFIG)  # opening it for reading would wait for a writer forever


# (case id, how to break the good adapter, regex the AdapterLoadError must match)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("r-string", config_change(r="abc"), r"r must be an integer >= 1, got 'abc'"),
    ("r-float", config_change(r=4.0), r"r must be an integer >= 1, got 4\.0"),
    ("r-negative", config_change(r=-4), r"r must be an integer >= 1, got -4"),
    ("r-zero", config_change(r=0), r"r must be an integer >= 1, got 0"),
    ("r-bool", config_change(r=True), r"r must be an integer >= 1, got True"),
    ("r-huge", config_change(r=10**12), r"r=1000000000000 is above max_lora_rank=16"),
    ("alpha-string", config_change(lora_alpha="eight"), r"lora_alpha must be a finite number > 0, got 'eight'"),
    ("alpha-nan", config_change(lora_alpha=float("nan")), r"lora_alpha must be a finite number > 0, got nan"),
    ("alpha-huge", config_change(lora_alpha=1e30), r"layer 0 q_proj: lora_B x scaling .* above the bound"),
    ("targets-int", config_change(target_modules=7), r"target_modules must be a module name, a list"),
    ("targets-empty", config_change(target_modules=[]), r"target_modules must be a module name, a list"),
    ("targets-unserved", config_change(target_modules=["lm_head", "embed_tokens"]),
     r"target_modules: 'lm_head' is not a module this engine applies LoRA to; allowed: q_proj, k_proj"),
    ("targets-unknown", config_change(target_modules=["q_proj", "v_proj", "foo_proj"]), r"'foo_proj' is not a module"),
    ("targets-regex-lm-head", config_change(target_modules=r".*(q_proj|v_proj|lm_head)"),
     r"selects 'lm_head', which this engine does not apply LoRA to"),
    ("layers-out-of-range", config_change(layers_to_transform=[0, 5]),
     r"layers_to_transform holds layer 5, but the base model has 2 layers"),
    ("layers-wrong-type", config_change(layers_to_transform="0"), r"layers_to_transform must be a layer index"),
    ("rank-pattern-list", config_change(rank_pattern=["q_proj"]), r"rank_pattern must be an object"),
    ("rank-pattern-value", config_change(rank_pattern={"q_proj": "big"}), r"rank_pattern\['q_proj'\] must be an integer"),
    ("alpha-pattern-bad-regex", config_change(alpha_pattern={"(": 2}),
     r"alpha_pattern: key '\(' is not a valid regular expression"),
    ("alpha-pattern-nested-quantifier", config_change(alpha_pattern={"(a+)+$": 2, r"(\w+\s?)+$": 2}),
     r"alpha_pattern: key '\(a\+\)\+\$' quantifies a group .*nested quantifiers"),
    ("alpha-pattern-backreference", config_change(alpha_pattern={r"(q)\1_proj": 2}), r"alpha_pattern: .*backreference"),
    ("alpha-pattern-value", config_change(alpha_pattern={"v_proj": [1]}), r"alpha_pattern\['v_proj'\] must be a finite"),
    ("rslora-not-bool", config_change(use_rslora="yes"), r"use_rslora must be true or false, got 'yes'"),
    ("peft-type", config_change(peft_type="IA3"), r"peft_type must be 'LORA', got 'IA3'"),
    ("peft-type-missing", config_change(peft_type=_DROP), r"peft_type is missing"),
    ("fan-in-fan-out", config_change(fan_in_fan_out=True), r"fan_in_fan_out=true is not supported"),
    ("dora", config_change(use_dora=True), r"use_dora=true is not supported"),
    ("bias", config_change(bias="lora_only"), r"bias='lora_only' is not supported; allowed: 'none'"),
    ("modules-to-save", config_change(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
    ("layer-replication", config_change(layer_replication=[[0, 2], [1, 2]]), r"layer_replication=.* is not supported"),
    ("config-not-object", raw_config(b"[1, 2]"), r"adapter_config.json must hold a JSON object, got list"),
    ("config-empty-object", raw_config(b"{}"), r"adapter_config.json is an empty object"),
    ("config-not-utf8", raw_config(b'{"r": "\xff\xfe"}'), r"adapter_config.json is not UTF-8 text"),
    ("config-not-json", raw_config(b"{nope"), r"adapter_config.json is not valid JSON"),
    ("config-huge", raw_config(b"{" + b" " * (2 << 20) + b"}"), r"adapter_config.json is \d+ bytes, more than"),
    ("config-fifo", _fifo_config, r"adapter_config.json is not a regular file"),
    ("config-missing", _remove(CONFIG), r"adapter_config.json not found"),
    ("weights-missing", _remove(WEIGHTS), r"adapter_model.safetensors not found \(nor adapter_model.bin"),
    ("weights-corrupt-header", lambda d: (d / WEIGHTS).write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": [1"),
     r"adapter_model.safetensors is not a readable safetensors file"),
    ("weights-nan", tensor_change(_set(key(1, "v_proj", "B"), _nan)),
     r"adapter 'weights-nan': layer 1 v_proj lora_B holds non-finite values \(NaN/Inf\)"),
    ("weights-1e30", tensor_change(_set(key(0, "q_proj", "A"), _huge)),
     r"layer 0 q_proj lora_A holds values up to 1e\+30, above the bound"),
    ("weights-int8", tensor_change(_all_int8), r"layer 0 q_proj lora_A has dtype int8; LoRA weights must be"),
    ("weights-layer-missing-in-base", tensor_change(_add_key(key(7, "q_proj", "A"), (4, 32))),
     r"is for layer 7, but the base model has 2 layers"),
    ("weights-module-not-targeted", tensor_change(_add_key(key(0, "k_proj", "A"), (4, 32))),
     r"layer 0 k_proj is not selected by adapter_config.json \(target_modules=\['q_proj', 'v_proj'\]\)"),
    ("weights-lm-head", tensor_change(_add_key("base_model.model.lm_head.lora_A.weight", (4, 32))),
     r"tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA A/B weight of a served module"),
    ("weights-lm-head-copy", tensor_change(_add_key("base_model.model.lm_head.weight", (300, 32))),
     r"'base_model.model.lm_head.weight' .*: it is a trained copy of lm_head's own weights \(modules_to_save"),
    ("weights-embedding-lora", tensor_change(_add_key("base_model.model.model.embed_tokens.lora_embedding_A", (4, 300))),
     r"'base_model.model.model.embed_tokens.lora_embedding_A' .*: it is embedding LoRA on embed_tokens, which this"),
    ("weights-missing-b", tensor_change(_drop_key(key(1, "q_proj", "B"))), r"layer 1 q_proj: has lora_A but no lora_B"),
    ("weights-wrong-shape", tensor_change(_set(key(0, "v_proj", "A"), lambda t: torch.zeros(4, 33))),
     r"layer 0 v_proj: lora_A \[4, 33\] / lora_B \[16, 4\] do not fit the base"),
    ("weights-rank-not-r", config_change(r=8), r"layer 0 q_proj: lora_A / lora_B have rank 4, but adapter_config.json "
                                                r"gives this module r=8"),
    ("weights-excluded-module", config_change(exclude_modules=["q_proj"]),
     r"layer 0 q_proj is not selected by adapter_config.json \(.*exclude_modules=\['q_proj'\]\)"),
]


@pytest.fixture(scope="module")
def bad_engine(small: dict[str, Path]) -> Iterator[Engine]:
    bad_root = small["root"] / "bad"
    specs = [AdapterSpec(GOOD, str(small["good"]))]
    for case_id, breaker, _ in CASES:
        directory = _copy(small["good"], bad_root / case_id)
        breaker(directory)
        specs.append(AdapterSpec(case_id, str(directory)))
    # Loads are lazy here: each bad adapter fails through the background load path, as a cold
    # adapter would. A timeout well above any real load: a hang shows as "timed out", not a pass.
    engine = Engine(EngineConfig(model=str(small["base"]), adapters=tuple(specs), max_lora_rank=16,
                                 max_adapter_slots=4, num_kv_blocks=64, preload_adapters=False,
                                 adapter_load_timeout_s=20.0, adapter_failure_ttl_s=0.0))
    yield engine
    engine.shutdown()


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case_id", "needle"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_adapter_refused_and_next_request_served(bad_engine: Engine, case_id: str, needle: str) -> None:
    async def scenario() -> tuple[list[Any], Any]:
        bad = await asyncio.gather(*(bad_engine.complete("x y", PARAMS, case_id) for _ in range(2)),
                                   return_exceptions=True)
        good = await bad_engine.complete("x y", PARAMS, GOOD)
        return bad, good

    bad, good = asyncio.run(scenario())
    for result in bad:
        assert isinstance(result, AdapterLoadError), result
        assert result.adapter_id == case_id and "timed out" not in str(result)
        assert __import__("re").search(needle, str(result)), str(result)
    assert good.generated_tokens == 3
    assert bad_engine.pool.tier(GOOD) == "device"


def test_good_adapter_direct_load_and_peft_pattern_semantics(small: dict[str, Path], tmp_path: Path) -> None:
    """Plain and regex rank/alpha_pattern keys keep PEFT's meaning (first matching key wins)."""
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.{b}.{m}" for i in range(12) for b, m in
             [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]]
    keys = ["q_proj", "model.layers.0.self_attn.q_proj", r"layers\.\d+\.mlp\.down_proj", "^q_proj", "(q|v)_proj",
            r".*\.1\d\..*", "0.self_attn.q_proj", "[0-3].self_attn.v_proj", "proj", r"\bv_proj"]
    for k in keys:
        import re

        compiled = re.compile(f"(?:{k})")
        for name in names:
            assert matches_key(compiled, name) == (get_pattern_key([k], name) == k), (k, name)

    adapter_dir = _copy(small["good"], tmp_path / "patterned")
    config_change(alpha_pattern={"model.layers.0.self_attn.q_proj": 2.0, r"layers\.1\..*": 16.0, "v_proj": 4.0},
                  rank_pattern={"q_proj": 4})(adapter_dir)
    engine = Engine(EngineConfig(model=str(small["base"]), adapters=(AdapterSpec("p", str(adapter_dir)),),
                                 max_lora_rank=16, num_kv_blocks=32))
    try:
        weights = engine.pool.records["p"].adapter.weights  # type: ignore[union-attr]
        assert weights[(0, "q_proj")].scaling == 2.0 / 4  # the full-name key, first in order
        assert weights[(1, "q_proj")].scaling == 16.0 / 4 and weights[(1, "v_proj")].scaling == 16.0 / 4
        assert weights[(0, "v_proj")].scaling == 4.0 / 4
        assert asyncio.run(engine.complete("x y", PARAMS, "p")).generated_tokens == 3
    finally:
        engine.shutdown()


# ---- where files may be read from -----------------------------------------------------------------
@pytest.fixture()
def rooted(small: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Engine, Path, Path]]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    _copy(small["good"], outside / "evil")
    allowed.mkdir()
    engine = Engine(EngineConfig(model=str(small["base"]), adapters=(AdapterSpec(GOOD, str(small["good"])),),
                                 max_lora_rank=16, num_kv_blocks=32, adapter_source_roots=(str(allowed),),
                                 allow_dynamic_adapters=True))
    yield engine, allowed, outside / "evil"
    engine.shutdown()


def test_file_symlinked_out_of_the_root_is_refused_at_read(rooted: tuple[Engine, Path, Path], small: dict[str, Path]) -> None:
    engine, allowed, evil = rooted
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    shutil.copy(small["good"] / CONFIG, sneaky / CONFIG)
    (sneaky / WEIGHTS).symlink_to(evil / WEIGHTS)  # the directory is inside the root, the weights are not
    engine.pool.check_source(str(sneaky))  # the directory itself passes the source check ...
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors resolves outside the allowed root"):
        engine.load_adapter(AdapterSpec("sneaky", str(sneaky)))  # ... its file does not, when read
    assert "sneaky" not in [a["id"] for a in engine.adapter_info()]
    # The same through dynamic loading (a request naming the directory).
    with pytest.raises(AdapterLoadError, match="resolves outside the allowed root"):
        asyncio.run(engine.complete("x y", PARAMS, str(sneaky)))
    assert asyncio.run(engine.complete("x y", PARAMS, GOOD)).generated_tokens == 3


def test_symlink_swapped_in_after_registration_is_refused_at_next_read(
    rooted: tuple[Engine, Path, Path], small: dict[str, Path]
) -> None:
    engine, allowed, evil = rooted
    target = _copy(small["good"], allowed / "swap")
    engine.load_adapter(AdapterSpec("swap", str(target)))
    assert asyncio.run(engine.complete("x y", PARAMS, "swap")).generated_tokens == 3
    (target / CONFIG).unlink()
    (target / CONFIG).symlink_to(evil / CONFIG)
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json resolves outside the allowed root"):
        engine.reload_adapter("swap")
    # A read after the host copy is gone (a host-cache miss) goes through the background path.
    engine.unload_adapter("swap")
    engine.load_adapter(AdapterSpec("swap", str(target)), preload=False)
    with pytest.raises(AdapterLoadError, match="resolves outside the allowed root"):
        asyncio.run(engine.complete("x y", PARAMS, "swap"))
    # The whole directory swapped for a link out of the root: still confined to the root.
    moved = _copy(small["good"], allowed / "dir-swap")
    engine.load_adapter(AdapterSpec("dir-swap", str(moved)), preload=False)
    shutil.rmtree(moved)
    moved.symlink_to(evil, target_is_directory=True)
    with pytest.raises(AdapterLoadError, match="resolves outside the allowed root"):
        asyncio.run(engine.complete("x y", PARAMS, "dir-swap"))
    assert asyncio.run(engine.complete("x y", PARAMS, GOOD)).generated_tokens == 3


def test_one_source_rule_for_pool_and_admin(rooted: tuple[Engine, Path, Path]) -> None:
    import serve_app.admin as admin

    engine, allowed, evil = rooted
    assert admin.check_source is check_source  # one function, not two copies that drift
    for bad in ["", "org/na\x00me", str(evil), "relative/dir/x"]:
        with pytest.raises(PermissionError):
            engine.pool.check_source(bad)
        with pytest.raises(PermissionError):
            admin.check_source(bad, [str(allowed)])
    engine.pool.check_source("org/name")


def _hub_blob_layout(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """huggingface_hub's real cache layout: snapshots/<commit>/<file> are relative links into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_cache_layout_loads_and_a_link_out_of_the_cache_is_refused(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    _hub_blob_layout(cache, "tiny-org/tiny-lora", small["good"])
    snapshot = _hub_blob_layout(cache, "tiny-org/leaky-lora", small["good"])
    (snapshot / WEIGHTS).unlink()
    (snapshot / WEIGHTS).symlink_to(small["good"] / WEIGHTS)  # points out of the Hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = Engine(EngineConfig(model=str(small["base"]), hub_cache_dir=str(cache), max_lora_rank=16,
                                 num_kv_blocks=32, allow_dynamic_adapters=True,
                                 adapters=(AdapterSpec("hub", "tiny-org/tiny-lora"), AdapterSpec(GOOD, str(small["good"])))))
    try:
        a = asyncio.run(engine.complete("hello hub", PARAMS, "hub"))
        b = asyncio.run(engine.complete("hello hub", PARAMS, GOOD))
        assert a.token_ids == b.token_ids  # same files, through the cache's links
        engine.reload_adapter("hub")  # every read resolves again
        with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors resolves outside the allowed root"):
            asyncio.run(engine.complete("hello hub", PARAMS, "tiny-org/leaky-lora"))
    finally:
        engine.shutdown()


def test_hub_repo_with_only_adapter_model_bin_loads(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub repo in PEFT's older format: no safetensors file, so the pool fetches adapter_model.bin too.

    The fake Hub below puts the .bin into the snapshot only when a download asks for it, as
    snapshot_download(allow_patterns=...) does; the real resolver then finds it offline.
    """
    bin_only = _copy(small["good"], tmp_path / "bin-only")
    torch.save(load_file(str(bin_only / WEIGHTS)), bin_only / "adapter_model.bin")
    (bin_only / WEIGHTS).unlink()
    cache = tmp_path / "hub"
    bin_link = _hub_blob_layout(cache, "tiny-org/old-lora", bin_only) / "adapter_model.bin"
    blob = os.readlink(bin_link)
    bin_link.unlink()  # not downloaded yet
    fetched: list[Any] = []
    real = adapter_reader.resolve_local_dir

    def fake_hub(ref: str, revision: str | None = None, cache_dir: str | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
        fetched.append((ref, revision, allow_patterns))
        if ref == "tiny-org/old-lora" and "adapter_model.bin" in (allow_patterns or []) and not bin_link.is_symlink():
            bin_link.symlink_to(blob)  # what the download of that pattern would add
        return real(ref, revision, cache_dir, allow_patterns)

    monkeypatch.setattr(adapter_reader, "resolve_local_dir", fake_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = Engine(EngineConfig(model=str(small["base"]), hub_cache_dir=str(cache), max_lora_rank=16,
                                 num_kv_blocks=32, adapters=(AdapterSpec("old", "tiny-org/old-lora"),
                                                             AdapterSpec(GOOD, str(small["good"])))))
    try:
        assert (asyncio.run(engine.complete("hello hub", PARAMS, "old")).token_ids
                == asyncio.run(engine.complete("hello hub", PARAMS, GOOD)).token_ids)  # the same weights
        # Asked for safetensors first; then for the .bin alone, pinned to the commit the first call found.
        assert [call for call in fetched if call[0] == "tiny-org/old-lora"] == [
            ("tiny-org/old-lora", None, adapter_reader.ADAPTER_FILE_PATTERNS),
            ("tiny-org/old-lora", "a" * 40, ["adapter_model.bin"]),
        ]
    finally:
        engine.shutdown()


# ---- the base model an adapter names ---------------------------------------------------------------
def test_base_model_mismatch_is_reported_not_refused(small: dict[str, Path], tmp_path: Path) -> None:
    from serve_app.core import ReplicaCore

    other = _copy(small["good"], tmp_path / "other-base")
    config_change(base_model_name_or_path="meta-llama/Llama-2-7b-hf")(other)
    hub_style = _copy(small["good"], tmp_path / "hub-style")
    config_change(base_model_name_or_path=f"some-org/{small['base'].name.upper()}")(hub_style)  # lenient match
    core = ReplicaCore(EngineConfig(model=str(small["base"]), max_lora_rank=16, num_kv_blocks=32, adapters=(
        AdapterSpec(GOOD, str(small["good"])), AdapterSpec("other", str(other)), AdapterSpec("hub-style", str(hub_style)),
    )), "validation")
    try:
        described = {a["id"]: a for a in core.engine.adapter_info()}
        assert described["other"]["base_model_mismatch"] is True
        assert described["other"]["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
        assert described[GOOD]["base_model_mismatch"] is False
        assert described[GOOD]["base_model_name_or_path"] == str(small["base"])
        assert described["hub-style"]["base_model_mismatch"] is False
        assert asyncio.run(core.engine.complete("x y", PARAMS, "other")).generated_tokens == 3  # still served
        listing = asyncio.run(core.admin("list", {}))["result"]["adapters"]  # the admin listing shows it
        assert {a["id"]: a["base_model_mismatch"] for a in listing} == {GOOD: False, "other": True, "hub-style": False}
        public = core.info()["adapters"]  # /info shows the flag, never the name it found (it may be a path)
        assert {a["id"]: a["base_model_mismatch"] for a in public} == {GOOD: False, "other": True, "hub-style": False}
        assert all(set(a) == {"id", "base_model_mismatch"} for a in public)
    finally:
        core.shutdown()


# ---- load timeout ----------------------------------------------------------------------------------
def test_hung_loads_time_out_and_do_not_starve_other_loads(
    small: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = adapter_reader.resolve_local_dir

    def stalled_hub(ref: str, *args: Any, **kwargs: Any) -> Path:
        if ref.startswith("stalled-org/"):  # a Hub download that never progresses
            release.wait(60)
        return real(ref, *args, **kwargs)

    monkeypatch.setattr(adapter_reader, "resolve_local_dir", stalled_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # once released, the abandoned loads end at once
    cold = [AdapterSpec(f"cold-{i}", str(small["good"])) for i in range(2)]
    engine = Engine(EngineConfig(model=str(small["base"]), max_lora_rank=16, num_kv_blocks=32,
                                 allow_dynamic_adapters=True, preload_adapters=False, adapters=tuple(cold),
                                 adapter_load_timeout_s=0.5, adapter_failure_ttl_s=0.0))
    try:
        async def stalled_then_cold() -> list[Any]:
            # Three hung loads: more than the two loads that run at once.
            stalled = [engine.complete("x y", PARAMS, f"stalled-org/lora-{i}") for i in range(3)]
            return await asyncio.gather(*stalled, return_exceptions=True)

        results = asyncio.run(stalled_then_cold())
        assert all(isinstance(r, AdapterLoadError) for r in results), results
        assert all("load timed out after 0.5 s (adapter_load_timeout_s)" in str(r) for r in results)
        # The hung threads still run, but no longer hold the loaders' places: cold adapters load.
        async def cold_loads() -> list[Any]:
            return await asyncio.wait_for(asyncio.gather(
                *(engine.complete("x y", PARAMS, spec.adapter_id) for spec in cold)), timeout=30)

        outs = asyncio.run(cold_loads())
        assert [o.generated_tokens for o in outs] == [3, 3]
        # A synchronous (admin) load of a hung source is bounded the same way.
        with pytest.raises(AdapterLoadError, match=r"load timed out after 0.5 s"):
            engine.load_adapter(AdapterSpec("sync", "stalled-org/sync"))
        assert "stalled-org/lora-0" not in [a["id"] for a in engine.adapter_info()] and "sync" not in [a["id"] for a in engine.adapter_info()]
        assert engine.stats().adapters.load_failures >= 3
    finally:
        release.set()
        engine.shutdown()


# ---- what the project ships still loads ------------------------------------------------------------
def test_bundled_zoo_showcase_and_demo_adapters_all_load(tmp_path: Path) -> None:
    from transformers import AutoConfig, LlamaConfig

    from engine.adapter_config import base_model_mismatch, served_base_names
    from engine.adapters import load_peft_adapter
    from engine.model_arch import ModelArch
    from models.demo import build_demo, demo_adapter_specs
    from models.gguf_convert import HF_ID, MODEL_NAME
    from models.resolve import SHOWCASE_ADAPTERS_DIR, ZOO_DIR, adapter_dirs

    # SmolLM2-135M's shapes (its converted weights are not needed to validate adapters against them).
    smollm2 = ModelArch.from_hf_config(LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, tie_word_embeddings=True))
    demo = build_demo(tmp_path)
    groups = [
        (ModelArch.from_hf_config(AutoConfig.from_pretrained(str(ZOO_DIR / "base"))), served_base_names(str(ZOO_DIR / "base")),
         adapter_dirs(ZOO_DIR / "adapters"), 30),
        (smollm2, (str(tmp_path / MODEL_NAME), HF_ID), adapter_dirs(SHOWCASE_ADAPTERS_DIR), 4),
        (ModelArch.from_hf_config(AutoConfig.from_pretrained(str(demo / "base"))), served_base_names(str(demo / "base")),
         demo_adapter_specs(demo), 8),
    ]
    for arch, served, specs, count in groups:
        assert len(specs) == count
        for spec in specs:
            adapter = load_peft_adapter(spec.adapter_id, Path(spec.source), arch, 64, torch.float32)
            assert adapter.weights and adapter.rank <= 64, spec
            assert not base_model_mismatch(adapter.base_model, served), (spec, adapter.base_model, served)
