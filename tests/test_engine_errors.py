"""Bad input gets a typed error naming the field; the engine goes on serving."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from engine import (
    AdapterLoadError,
    AdapterSpec,
    Engine,
    EngineConfig,
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    SamplingParams,
    UnknownAdapterError,
)
from models.synthetic import build_adapter
from tests.helpers import TinyFamily, make_engine


@pytest.fixture(scope="module")
def engine(families: dict[str, TinyFamily]) -> Engine:
    eng = make_engine(families["llama"], max_model_len=128)
    yield eng
    eng.shutdown()


def run(engine: Engine, prompt: object, params: SamplingParams | None = None, adapter: str | None = None):
    return asyncio.run(engine.complete(prompt, params or SamplingParams(max_new_tokens=4), adapter))  # type: ignore[arg-type]


BAD_PARAMS = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=5.0), "frequency_penalty"),
    (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop"),
    (dict(top_n_tokens=100), "top_n_tokens"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_PARAMS)
def test_bad_sampling_values(engine: Engine, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        run(engine, "hello", SamplingParams(**{"max_new_tokens": 4, **kwargs}))
    assert err.value.field == field and field in str(err.value)
    assert run(engine, "hello").generated_tokens >= 1  # still serving


def test_unknown_adapter_lists_the_available_ones(engine: Engine) -> None:
    with pytest.raises(UnknownAdapterError) as err:
        run(engine, "hello", adapter="nope")
    assert "nope" in str(err.value) and "qv-r4" in str(err.value) and err.value.field == "adapter_id"


def test_empty_and_too_long_prompts(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="inputs"):
        run(engine, "")
    with pytest.raises(InvalidRequestError, match="must be <= 128"):
        run(engine, "the quick brown fox " * 100)
    with pytest.raises(InvalidRequestError, match="token ids"):
        run(engine, [1, 2, 10**7])
    # truncate keeps the last tokens, as TGI does
    out = asyncio.run(engine.complete("the quick brown fox " * 100, SamplingParams(max_new_tokens=4), truncate=20))
    assert out.prompt_tokens == 20
    engine.check_idle_invariants()


def test_queue_bound_gives_overload_and_nothing_is_lost(families: dict[str, TinyFamily]) -> None:
    eng = make_engine(families["llama"], max_waiting=3, max_num_seqs=1)

    async def flood() -> tuple[int, int]:
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        results = await asyncio.gather(*(eng.complete("ray serve", params) for _ in range(12)), return_exceptions=True)
        ok = sum(1 for r in results if not isinstance(r, BaseException))
        overloaded = sum(1 for r in results if isinstance(r, OverloadedError))
        assert ok + overloaded == 12, results
        return ok, overloaded

    try:
        ok, overloaded = asyncio.run(flood())
        assert ok >= 3 and overloaded >= 1
        eng.check_idle_invariants()
    finally:
        eng.shutdown()


def test_a_dead_step_loop_fails_waiting_requests_and_refuses_new_ones(
    families: dict[str, TinyFamily], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug outside the model step kills the step thread: callers hear back (never hang), health says so."""
    eng = make_engine(families["llama"])

    def broken_schedule() -> None:
        raise RuntimeError("scheduler bug")

    try:
        assert run(eng, "hello").generated_tokens >= 1 and eng.is_alive()
        monkeypatch.setattr(eng.scheduler, "schedule", broken_schedule)
        with pytest.raises(EngineDeadError, match="scheduler bug"):
            run(eng, "hello")
        assert not eng.is_alive()
        with pytest.raises(EngineDeadError, match="step loop died"):  # refused before anything is queued
            run(eng, "hello again")
    finally:
        eng.shutdown()


def test_abort_frees_everything(engine: Engine) -> None:
    async def start_then_abort() -> None:
        agen = engine.generate("abort me", SamplingParams(max_new_tokens=100, ignore_eos=True), "all-r64", request_id="to-abort")
        first = await agen.__anext__()
        assert not first.finished
        assert engine.abort("to-abort")
        rest = [out async for out in agen]
        assert rest and rest[-1].finish_reason == "aborted"

    asyncio.run(start_then_abort())

    async def close_early() -> None:  # a client that goes away: closing the stream aborts
        agen = engine.generate("go away", SamplingParams(max_new_tokens=100, ignore_eos=True), "qv-r4")
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if engine.stats().num_running == 0:
                return
            await asyncio.sleep(0.02)

    asyncio.run(close_early())
    engine.check_idle_invariants()
    assert engine.stats().aborted >= 2


# ---- adapter validation ---------------------------------------------------------------------------

def _variant(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(use_dora=True), "use_dora"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "bias"),
        (dict(peft_type="IA3"), "peft_type"),
    ],
)
def test_unsupported_adapter_options(families: dict[str, TinyFamily], tmp_path: Path, changes: dict, needle: str) -> None:
    fam = families["llama"]
    bad = _variant(fam.adapters["qv-r4"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterLoadError, match=needle):
        Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("bad", str(bad)),)))


def test_rank_above_max_and_wrong_base(families: dict[str, TinyFamily], tmp_path: Path) -> None:
    fam = families["llama"]
    with pytest.raises(AdapterLoadError, match="above max_lora_rank=16"):
        Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("big", str(fam.adapters["all-r64"])),), max_lora_rank=16))
    wide = tmp_path / "wide"
    from models.synthetic import build_model

    wide_base = build_model(tmp_path / "wide-base", "llama", hidden_size=96, num_heads=4, num_kv_heads=2)
    build_adapter(wide, wide_base, rank=4)
    with pytest.raises(AdapterLoadError, match="do not fit the base"):
        Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("wide", str(wide)),)))


def test_missing_and_corrupt_adapter_files(families: dict[str, TinyFamily], tmp_path: Path) -> None:
    fam = families["llama"]
    with pytest.raises(AdapterLoadError, match=r"not a directory|neither"):
        Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("gone", str(tmp_path / "does-not-exist")),)))
    corrupt = _variant(fam.adapters["qv-r4"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterLoadError, match="safetensors"):
        Engine(EngineConfig(model=str(fam.base), adapters=(AdapterSpec("corrupt", str(corrupt)),)))
