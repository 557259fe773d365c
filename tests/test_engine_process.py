"""EngineProcess (engine/engine_process.py): an Engine in a child process behind the same methods.

Same tokens as the in-process Engine for every demo adapter, errors arriving with their class and
fields, early close aborting in the worker and freeing its blocks, adapter admin through calls, a
dead worker failing open streams at once, a failed start reported, and a worker that never
outlives its parent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterSpec,
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineError,
    EngineProcess,
    InvalidRequestError,
    NonFiniteOutputError,
    OverloadedError,
    QueueTimeoutError,
    RequestTimeoutError,
    SamplingParams,
    UnknownAdapterError,
)
from engine.errors import error_from_wire, error_to_wire
from models.demo import DEMO_ADAPTERS, build_demo, demo_adapter_specs

DEMO_IDS = sorted(a[0] for a in DEMO_ADAPTERS)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("engine-process"))


def _config(demo_dir: Path, **overrides: Any) -> EngineConfig:
    base: dict[str, Any] = dict(model=str(demo_dir / "base"), adapters=demo_adapter_specs(demo_dir),
                                num_kv_blocks=256, max_model_len=256)
    return EngineConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def remote(demo_dir: Path) -> Iterator[EngineProcess]:
    ep = EngineProcess(_config(demo_dir), torch_threads=1)
    yield ep
    ep.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wait_idle(ep: EngineProcess, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ep.check_idle_invariants()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_same_tokens_as_the_in_process_engine(demo_dir: Path, remote: EngineProcess) -> None:
    local = Engine(_config(demo_dir))
    adapters: list[str | None] = [None, *DEMO_IDS]
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=7)

    async def both(engine: Engine | EngineProcess) -> list[Any]:
        jobs = [engine.complete(PROMPT, greedy, adapter_id=a) for a in adapters]
        jobs.append(engine.complete(PROMPT, sampled, adapter_id="qv-r4"))
        return await asyncio.gather(*jobs)

    try:
        mine, theirs = run(both(local)), run(both(remote))
    finally:
        local.shutdown()
    assert [o.token_ids for o in theirs] == [o.token_ids for o in mine]
    assert [o.generated_text for o in theirs] == [o.generated_text for o in mine]
    assert [o.adapter_id for o in theirs] == [*adapters, "qv-r4"]
    assert len({o.token_ids for o in theirs}) > 3  # the adapters do change the tokens
    assert [(o.finish_reason, o.generated_tokens, o.seed) for o in theirs] == [
        (o.finish_reason, o.generated_tokens, o.seed) for o in mine]
    assert all(o.finished for o in theirs)
    # The streamed deltas add up to the final text.
    async def stream() -> list[Any]:
        return [out async for out in remote.generate(PROMPT, greedy, adapter_id="attn-r8")]

    outs = run(stream())
    assert "".join(o.text for o in outs) == outs[-1].generated_text == mine[adapters.index("attn-r8")].generated_text
    wait_idle(remote)


def test_tokenize_and_limits_answer_locally(remote: EngineProcess) -> None:
    assert remote.max_model_len == 256 and remote.vocab_size > 0
    assert remote.tokenize(PROMPT) == list(remote.tokenizer.encode(PROMPT))
    assert remote.tokenize(PROMPT, truncate=2) == list(remote.tokenizer.encode(PROMPT))[-2:]
    with pytest.raises(InvalidRequestError) as err:
        remote.tokenize([0, remote.vocab_size])
    assert err.value.field == "inputs"
    assert remote.has_adapter("qv-r4") and not remote.has_adapter("nope")


def test_errors_arrive_with_their_class_and_fields(remote: EngineProcess) -> None:
    async def first(**kw: Any) -> Any:
        return await remote.complete(PROMPT, SamplingParams(max_new_tokens=4), **kw)

    with pytest.raises(UnknownAdapterError) as unknown:
        run(first(adapter_id="nope"))
    assert unknown.value.field == "adapter_id" and unknown.value.adapter_id == "nope"
    assert "qv-r4" in str(unknown.value)
    with pytest.raises(InvalidRequestError) as too_long:
        run(remote.complete(PROMPT, SamplingParams(max_new_tokens=250)))
    assert too_long.value.field == "inputs" and "max_new_tokens" in str(too_long.value)
    with pytest.raises(InvalidRequestError) as empty:
        run(remote.complete(""))
    assert empty.value.field == "inputs"
    wait_idle(remote)


def test_overload_is_refused_with_retry_after(demo_dir: Path) -> None:
    ep = EngineProcess(_config(demo_dir, max_num_seqs=1, max_waiting=1), torch_threads=1)

    async def burst() -> list[Any]:
        jobs = [ep.complete(PROMPT, SamplingParams(max_new_tokens=40), adapter_id="qv-r4") for _ in range(4)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        results = run(burst())
        refused = [r for r in results if isinstance(r, OverloadedError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert refused and served and len(refused) + len(served) == 4
        assert all(r.retry_after_s > 0 and r.scope in ("adapter", "replica") for r in refused)
        assert ep.stats().rejected == len(refused)
        wait_idle(ep)
    finally:
        ep.shutdown()


def test_closing_early_aborts_in_the_worker(remote: EngineProcess) -> None:
    before = remote.stats().aborted

    async def read_two() -> int:
        n = 0
        async for _ in remote.generate(PROMPT, SamplingParams(max_new_tokens=200), adapter_id="mlp-r16"):
            n += 1
            if n == 2:
                break  # the generator is closed here: the worker aborts the request
        return n

    assert run(read_two()) == 2
    wait_idle(remote)
    assert remote.stats().aborted == before + 1


def test_adapter_admin_through_calls(demo_dir: Path, remote: EngineProcess) -> None:
    ids = {a["id"] for a in remote.adapter_info()}
    assert ids == set(DEMO_IDS)
    source = str(demo_dir / "adapters" / "qv-r4")
    result = remote.load_adapter(AdapterSpec("copy-of-qv", source))
    assert result["id"] == "copy-of-qv" and result["bytes"] > 0
    assert remote.has_adapter("copy-of-qv")

    async def pair() -> list[Any]:
        params = SamplingParams(max_new_tokens=8)
        return await asyncio.gather(remote.complete(PROMPT, params, adapter_id="copy-of-qv"),
                                    remote.complete(PROMPT, params, adapter_id="qv-r4"))

    copy, original = run(pair())
    assert copy.token_ids == original.token_ids
    assert remote.reload_adapter("copy-of-qv")["id"] == "copy-of-qv"
    remote.unload_adapter("copy-of-qv")
    assert not remote.has_adapter("copy-of-qv")
    with pytest.raises(UnknownAdapterError):
        run(remote.complete(PROMPT, SamplingParams(max_new_tokens=2), adapter_id="copy-of-qv"))
    with pytest.raises(PermissionError):
        remote.check_adapter_source("/etc")
    wait_idle(remote)


def test_a_dead_worker_fails_open_streams_at_once(demo_dir: Path) -> None:
    ep = EngineProcess(_config(demo_dir), torch_threads=1)

    async def killed_mid_stream() -> tuple[int, BaseException | None, float]:
        n, error = 0, None
        killed_at = 0.0
        try:
            async for _ in ep.generate(PROMPT, SamplingParams(max_new_tokens=240), adapter_id="o-r2"):
                n += 1
                if n == 2:
                    killed_at = time.monotonic()
                    os.kill(ep.pid, signal.SIGKILL)
        except EngineDeadError as exc:
            error = exc
        return n, error, time.monotonic() - killed_at

    try:
        n, error, after_s = run(killed_mid_stream())
        assert error is not None and "exited" in str(error), (n, error)
        assert after_s < 5.0
        assert not ep.is_alive()
        with pytest.raises(EngineDeadError):
            run(ep.complete(PROMPT))
        with pytest.raises(EngineDeadError):
            ep.stats()
    finally:
        ep.shutdown()


def test_a_failed_start_raises_the_engines_error(tmp_path: Path) -> None:
    not_a_model = EngineConfig(model=str(tmp_path))  # a directory without a config.json
    with pytest.raises(ValueError) as in_process:
        Engine(not_a_model)
    with pytest.raises(ValueError) as remote:
        EngineProcess(not_a_model)
    assert str(remote.value) == str(in_process.value)


def test_the_worker_never_outlives_its_parent(demo_dir: Path) -> None:
    script = textwrap.dedent(f"""
        import os, sys
        from engine import EngineConfig, EngineProcess
        from models.demo import demo_adapter_specs
        from pathlib import Path
        d = Path({str(demo_dir)!r})
        ep = EngineProcess(EngineConfig(model=str(d / "base"), adapters=demo_adapter_specs(d), num_kv_blocks=64))
        print(ep.pid, flush=True)
        os._exit(0)  # no shutdown: the worker must notice on its own
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    child = int(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 15
    while _running(child):
        assert time.monotonic() < deadline, f"engine worker {child} still running after its parent exited"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("exc", [
    EngineError("boom"),
    InvalidRequestError("temperature", "must be > 0"),
    UnknownAdapterError("x", ["a", "b"]),
    AdapterLoadError("x", "bad shapes"),
    OverloadedError("full", retry_after_s=2.5, adapter_id="a", scope="replica"),
    QueueTimeoutError("waited"),
    RequestTimeoutError("ran long"),
    EngineDeadError("gone"),
    AdapterBusyError("x", "3 waiting"),
    NonFiniteOutputError("x"),
    PermissionError("not under the roots"),
])
def test_errors_cross_as_data(exc: BaseException) -> None:
    back = error_from_wire(error_to_wire(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    for attr in ("field", "adapter_id", "retry_after_s", "scope"):
        assert getattr(back, attr, None) == getattr(exc, attr, None)


def test_unknown_errors_cross_as_runtime_errors() -> None:
    class Internal(Exception):
        pass

    class HubFailure(FileNotFoundError):
        pass

    back = error_from_wire(error_to_wire(Internal("at /secret/path pid 42")))
    assert type(back) is RuntimeError  # the server logs its text and shows the client a generic message
    assert type(error_from_wire(error_to_wire(HubFailure("no such file")))) is FileNotFoundError


def test_replica_core_over_an_engine_process(demo_dir: Path) -> None:
    from serve_app.core import ReplicaCore

    config = _config(demo_dir)
    remote_core = ReplicaCore(config, "demo", engine_process=True, torch_threads=1)
    local_core = ReplicaCore(config, "demo")
    req: dict[str, Any] = {"prompt": PROMPT, "adapter_id": "qv-r4", "params": {"max_new_tokens": 6}, "details": True}
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "adapter_id": "o-r2",
                            "params": {"max_new_tokens": 4}}

    async def chunks(core: ReplicaCore, r: dict[str, Any]) -> list[dict[str, Any]]:
        return [item async for chunk in core.stream(r) for item in chunk]

    try:
        assert isinstance(remote_core.engine, EngineProcess)
        for r in (req, {**req, "adapter_id": None}):
            assert run(remote_core.generate(r)) == run(local_core.generate(r))  # type: ignore[arg-type]
        if getattr(local_core.engine.tokenizer, "chat_template", None):
            assert run(remote_core.generate(chat)) == run(local_core.generate(chat))  # type: ignore[arg-type]
        streamed = run(chunks(remote_core, req))
        assert "".join(c["text"] for c in streamed) == run(local_core.generate(req))["generated_text"]  # type: ignore[arg-type]
        error = run(remote_core.generate({**req, "adapter_id": "nope"}))["error"]  # type: ignore[arg-type]
        assert error["kind"] == "unknown_adapter" and error["field"] == "adapter_id"
        assert remote_core.info()["adapters"] == local_core.info()["adapters"]
        assert remote_core.health()["ok"] is True
        snapshot = remote_core.snapshot()
        assert snapshot["engine"]["finished"] >= 3
    finally:
        remote_core.shutdown()
        local_core.shutdown()
    assert not remote_core.engine.is_alive()


def test_engine_process_setting_is_a_bool() -> None:
    from serve_app.settings import AppSettings

    assert AppSettings.from_args({}).engine_process is False
    assert AppSettings.from_args({"engine_process": True}).engine_process is True
    with pytest.raises(ValueError, match="engine_process must be true or false, got 'yes'"):
        AppSettings.from_args({"engine_process": "yes"})
