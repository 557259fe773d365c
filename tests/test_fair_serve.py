"""Fair sharing under overload, the serve side (issue 13, points 2, 3 and 5), without Ray.

- Fast refusal end to end, through the same Starlette app the Serve ingress runs (LocalBackend over
  a ReplicaCore): adapter A floods past `max_waiting_per_adapter` while B keeps sending. Every A
  request beyond the bound gets 429 + Retry-After on /generate, /generate_stream and
  /v1/completions, answered while A's admitted requests are all still in the engine (the refusal
  waited for nothing), and B's requests get 200 with the tokens B gets alone, while A's are still
  in flight. /metrics counts the refusals for A only.
- Deadlines: `max_queue_wait_s` gives 503 + Retry-After (TGI and OpenAI shapes, streamed or not) and
  frees everything; the engine's `request_timeout_s` gives 504, or an in-band error event after the
  tokens already streamed; afterwards the engine's idle invariants hold.
- The error mapping (status, shape, Retry-After), the settings derived from EngineConfig (types,
  YAML spellings, `null` = off, config.yaml's own args), the launcher's flags, Serve's limits sized
  from the engine's bounds, and the per-adapter metric families with their bounded labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig, OverloadedError, QueueTimeoutError, RequestTimeoutError, SamplingParams
from models.demo import build_demo, demo_adapter_specs
from serve_app.admission_gate import AdmissionGate, GatedBackend
from serve_app.backends import LocalBackend
from serve_app.core import ReplicaCore
from serve_app.errors import error_info, openai_error, tgi_error
from serve_app.http_app import create_app
from serve_app.metrics import ADAPTER_LABELS_NAMED, OTHER_ADAPTERS_LABEL, ReplicaMetrics
from serve_app.metrics_exposition import render_prometheus
from serve_app.settings import ENGINE_KEYS, AppSettings
from tests.test_serve_http import wait_idle

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox"
FLOOD = "mlp-r16"  # adapter A, the flood
LIGHT = "qv-r4"  # adapter B
LONG = 900  # new tokens of A's admitted requests: seconds of decoding, far longer than anything checked meanwhile
PER_ADAPTER_BOUND = 3


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("loraserve-cache"))


def make_core(demo_dir: Path, **overrides: Any) -> ReplicaCore:
    config = EngineConfig(model=str(demo_dir / "base"), adapters=demo_adapter_specs(demo_dir), num_kv_blocks=512,
                          max_model_len=1024, **overrides)
    return ReplicaCore(config, "demo")


def client(core: ReplicaCore, gate: AdmissionGate | None = None) -> httpx.AsyncClient:
    """The ingress's HTTP app over `core`; with `gate`, behind the ingress's admission gate."""
    backend = LocalBackend(core)
    transport = httpx.ASGITransport(app=create_app(backend if gate is None else GatedBackend(backend, gate)))
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)


def tgi_body(adapter: str | None, max_new_tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if adapter:
        params["adapter_id"] = adapter
    return {"inputs": prompt, "parameters": params}


async def hold(core: ReplicaCore, adapter: str, i: int) -> AsyncIterator[list[dict[str, Any]]]:
    """A long streamed request straight to the replica (the ingress's stream call), left open; EOS ignored,
    so it runs for all LONG tokens (seconds) unless closed."""
    return core.stream({"prompt": f"{PROMPT} {i}", "adapter_id": adapter,
                        "params": {"max_new_tokens": LONG, "ignore_eos": True}})


def in_engine(core: ReplicaCore, adapter: str) -> tuple[int, int]:
    stats = core.engine.stats()
    return stats.running.get(adapter, 0), stats.waiting.get(adapter, 0)


async def until(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.01)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels minus `replica`: value} of one sample name in a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica"))] = s.value
    return out


def retry_after(r: httpx.Response) -> int:
    value = r.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


# ---- fast refusal, only for the flooding adapter -------------------------------------------------
def test_flooding_adapter_alone_gets_429_at_once_and_the_other_is_served(demo_dir: Path) -> None:
    core = make_core(demo_dir, max_num_seqs=2, max_waiting_per_adapter=PER_ADAPTER_BOUND)
    light_ref = asyncio.run(core.engine.complete(PROMPT, SamplingParams(max_new_tokens=16), adapter_id=LIGHT))

    async def scenario() -> None:
        running: list[AsyncIterator[list[dict[str, Any]]]] = []
        queued: list[tuple[AsyncIterator[list[dict[str, Any]]], asyncio.Future[Any]]] = []
        try:
            # A's admitted requests: both seats (each has its first token), then PER_ADAPTER_BOUND waiting.
            for i in range(2):
                stream = await hold(core, FLOOD, i)
                assert "error" not in (await stream.__anext__())[0]
                running.append(stream)
            for i in range(PER_ADAPTER_BOUND):
                stream = await hold(core, FLOOD, 10 + i)
                queued.append((stream, asyncio.ensure_future(stream.__anext__())))
            await until(lambda: in_engine(core, FLOOD) == (2, PER_ADAPTER_BOUND), "A holds 2 seats and 3 waiting")

            async with client(core) as http:
                # The flood beyond the bound, on every route: each refused while A's admitted requests all
                # still run or wait (nothing of A finished or left: the refusal waited for no capacity).
                floods = [http.post("/generate", json=tgi_body(FLOOD, 8, f"flood {i}")) for i in range(3)]
                floods += [http.post("/generate_stream", json=tgi_body(FLOOD, 8, f"flood s{i}")) for i in range(2)]
                floods.append(http.post("/v1/completions", json={"model": FLOOD, "prompt": "flood", "max_tokens": 8}))
                refused = []
                for answer in asyncio.as_completed(floods):
                    r = await answer
                    assert in_engine(core, FLOOD) == (2, PER_ADAPTER_BOUND)
                    assert not any(f.done() for _, f in queued)
                    refused.append(r)
                for r in refused:
                    assert r.status_code == 429, r.text
                    assert 1 <= retry_after(r) <= 60
                    if r.request.url.path.startswith("/v1/"):
                        assert r.json()["error"]["type"] == "rate_limit_error"
                        assert "max_waiting_per_adapter=3" in r.json()["error"]["message"]
                    else:
                        assert r.json()["error_type"] == "overloaded"
                        assert f"adapter {FLOOD!r}" in r.json()["error"]
                        assert "max_waiting_per_adapter=3" in r.json()["error"]

                # B meanwhile: served (a seat is taken back from A, the adapter holding most), with the
                # tokens B gets alone, while all of A's admitted requests are still in the engine.
                light = await asyncio.gather(*[http.post("/generate", json=tgi_body(LIGHT, 16)) for _ in range(2)])
                assert [r.status_code for r in light] == [200, 200], [r.text for r in light]
                assert all(r.json()["generated_text"] == light_ref.generated_text for r in light)
                assert sum(in_engine(core, FLOOD)) == 2 + PER_ADAPTER_BOUND

                metrics = (await http.get("/metrics")).text
            rejections = samples(metrics, "loraserve_adapter_rejections_total")
            assert rejections[(("adapter", FLOOD), ("reason", "overloaded"))] == len(floods)
            assert rejections[(("adapter", LIGHT), ("reason", "overloaded"))] == 0
            requests = samples(metrics, "loraserve_requests_total")
            assert requests[(("adapter", FLOOD), ("status", "overloaded"))] == len(floods)
            assert requests[(("adapter", LIGHT), ("status", "ok"))] == 2
            # B's requests (the two above and the reference run) were admitted (their queue wait observed)
            # and served their tokens: 16 generated = the prefill's + 15 decode positions each.
            assert samples(metrics, "loraserve_adapter_queue_wait_seconds_count")[(("adapter", LIGHT),)] == 3
            decoded = samples(metrics, "loraserve_adapter_scheduled_tokens_total")
            assert decoded[(("adapter", LIGHT), ("phase", "decode"))] == 3 * 15
            assert samples(metrics, "loraserve_adapter_weight")[(("adapter", FLOOD),)] == 1.0
            assert samples(metrics, "loraserve_scheduling_policy")[(("policy", "fair"),)] == 1.0
        finally:
            for stream, pending in queued:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
                await stream.aclose()
            for stream in running:
                await stream.aclose()

    try:
        asyncio.run(scenario())
        wait_idle(core)  # every KV block free, no pin, nothing running or waiting
    finally:
        core.shutdown()


def test_ingress_answers_the_flood_itself_after_the_first_refusal(demo_dir: Path) -> None:
    """The ingress's admission gate (serve_app/admission_gate.py) over the same app: once the replica has
    refused A, A's next requests get the same 429 from the ingress without reaching the replica; B is
    served as before; when one of A's requests ends, the next A request reaches the replica again."""
    core = make_core(demo_dir, max_num_seqs=2, max_waiting_per_adapter=PER_ADAPTER_BOUND)
    gate = AdmissionGate(hold_s=30.0)  # longer than the test: only an end of A's request reopens it

    async def scenario() -> None:
        running = [await hold(core, FLOOD, i) for i in range(2)]
        for stream in running:
            assert "error" not in (await stream.__anext__())[0]
        queued = [await hold(core, FLOOD, 10 + i) for i in range(PER_ADAPTER_BOUND)]
        pending = [asyncio.ensure_future(q.__anext__()) for q in queued]
        try:
            await until(lambda: in_engine(core, FLOOD) == (2, PER_ADAPTER_BOUND), "A holds 2 seats and 3 waiting")
            async with client(core, gate) as http:
                answers = [await http.post("/generate", json=tgi_body(FLOOD, 8, f"flood {i}")) for i in range(4)]
                answers.append(await http.post("/generate_stream", json=tgi_body(FLOOD, 8, "flood s")))
                answers.append(await http.post("/v1/completions", json={"model": FLOOD, "prompt": "f", "max_tokens": 8}))
                for r in answers:
                    assert r.status_code == 429, r.text
                    assert 1 <= retry_after(r) <= 60
                    assert "max_waiting_per_adapter=3" in r.text
                assert gate.refused_here == len(answers) - 1  # only the first reached the replica
                light = await http.post("/generate", json=tgi_body(LIGHT, 8))
                assert light.status_code == 200, light.text

                # One of A's requests ends (the client goes away); its place goes to the next A request,
                # which reaches the replica again (and waits there, since a waiting A request took the seat).
                await running.pop().aclose()
                gate.ended(FLOOD)  # the held stream went straight to the replica, not through the gate
                await until(lambda: in_engine(core, FLOOD) == (2, PER_ADAPTER_BOUND - 1), "a waiting A request runs")
                again = asyncio.ensure_future(http.post("/generate", json=tgi_body(FLOOD, 1, "after")))
                await until(lambda: in_engine(core, FLOOD)[1] == PER_ADAPTER_BOUND, "the next A request is queued")
                assert gate.refused_here == len(answers) - 1
                again.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await again
                metrics = (await http.get("/metrics")).text
            requests = samples(metrics, "loraserve_requests_total")
            assert requests[(("adapter", FLOOD), ("status", "overloaded"))] == 1  # what reached the replica
        finally:
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await task
            for stream in queued + running:
                await stream.aclose()

    try:
        asyncio.run(scenario())
        wait_idle(core)
    finally:
        core.shutdown()


# ---- deadlines -----------------------------------------------------------------------------------
def test_max_queue_wait_is_503_with_retry_after_and_frees_everything(demo_dir: Path) -> None:
    core = make_core(demo_dir, max_num_seqs=1, max_queue_wait_s=1.0)

    async def scenario() -> list[httpx.Response]:
        holder = await hold(core, FLOOD, 0)  # the only seat, for seconds
        try:
            assert "error" not in (await holder.__anext__())[0]
            async with client(core) as http:
                answers = await asyncio.gather(
                    http.post("/generate", json=tgi_body(FLOOD, 4)),
                    http.post("/generate_stream", json=tgi_body(LIGHT, 4)),
                    http.post("/v1/completions", json={"model": LIGHT, "prompt": PROMPT, "max_tokens": 4}),
                )
                assert in_engine(core, FLOOD)[0] == 1  # the seat was never free meanwhile
                answers.append(await http.get("/metrics"))
                return list(answers)
        finally:
            await holder.aclose()

    try:
        tgi, stream, oa, metrics = asyncio.run(scenario())
        for r in (tgi, stream):
            assert r.status_code == 503 and retry_after(r) == 5, r.text
            assert r.json()["error_type"] == "queue_timeout" and "max_queue_wait_s=1" in r.json()["error"]
        assert oa.status_code == 503 and retry_after(oa) == 5
        assert oa.json()["error"]["code"] == "queue_timeout" and oa.json()["error"]["type"] == "server_error"
        timeouts = samples(metrics.text, "loraserve_adapter_rejections_total")
        assert timeouts[(("adapter", FLOOD), ("reason", "queue_timeout"))] == 1
        assert timeouts[(("adapter", LIGHT), ("reason", "queue_timeout"))] == 2
        assert samples(metrics.text, "loraserve_requests_total")[(("adapter", LIGHT), ("status", "queue_timeout"))] == 2
        wait_idle(core)
        assert core.engine.stats().queue_timeouts == 3
    finally:
        core.shutdown()


# The demo model's greedy answer to this prompt has no EOS within 1,000 tokens for either adapter (fixed
# weights), and 1,000 tokens take seconds on a CPU: far past the 0.3 s deadline.
ENDLESS_PROMPT, ENDLESS_TOKENS = "hello lora", 1000


def test_engine_request_timeout_is_504_or_an_error_event_after_the_tokens(demo_dir: Path) -> None:
    core = make_core(demo_dir, request_timeout_s=0.3)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with client(core) as http:
            plain, streamed = await asyncio.gather(
                http.post("/generate", json=tgi_body(FLOOD, ENDLESS_TOKENS, ENDLESS_PROMPT)),
                http.post("/generate_stream", json=tgi_body(LIGHT, ENDLESS_TOKENS, ENDLESS_PROMPT)))
            short = await http.post("/generate", json=tgi_body(LIGHT, 4))
            return plain, streamed, short

    try:
        plain, streamed, short = asyncio.run(scenario())
        assert plain.status_code == 504 and "retry-after" not in plain.headers, plain.text
        assert plain.json()["error_type"] == "request_timeout" and "request_timeout_s=0.3" in plain.json()["error"]
        assert streamed.status_code == 200, streamed.text
        events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
        assert events[-1]["error_type"] == "request_timeout"
        assert 0 < len(events) - 1 < ENDLESS_TOKENS and all(e["token"] is not None for e in events[:-1])
        assert short.status_code == 200  # short requests finish within the deadline
        wait_idle(core)
        assert core.engine.stats().request_timeouts == 2
    finally:
        core.shutdown()


# ---- error mapping -------------------------------------------------------------------------------
def test_engine_errors_map_to_status_shape_and_retry_after() -> None:
    overloaded = error_info(OverloadedError("adapter 'a' already has 3 requests waiting", retry_after_s=2.2,
                                            adapter_id="a"))
    r = tgi_error(overloaded, {"x-request-id": "r"})
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.headers["x-request-id"] == "r"
    assert json.loads(r.body) == {"error": "adapter 'a' already has 3 requests waiting", "error_type": "overloaded"}
    r = openai_error(overloaded)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert json.loads(r.body)["error"]["type"] == "rate_limit_error"

    queue = error_info(QueueTimeoutError("no capacity for the request within max_queue_wait_s=60 s"))
    assert tgi_error(queue).status_code == 503 and tgi_error(queue).headers["retry-after"] == "5"
    assert json.loads(tgi_error(queue).body)["error_type"] == "queue_timeout"
    assert openai_error(queue).status_code == 503 and openai_error(queue).headers["retry-after"] == "5"

    timeout = error_info(RequestTimeoutError("the request ran past request_timeout_s=30 s"))
    assert tgi_error(timeout).status_code == 504 and "retry-after" not in tgi_error(timeout).headers
    assert json.loads(openai_error(timeout).body)["error"]["code"] == "request_timeout"


# ---- settings, launcher, Serve's limits ----------------------------------------------------------
def test_every_engine_knob_is_an_app_key_with_yaml_types() -> None:
    knobs = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "adapters", "extra"}
    assert set(ENGINE_KEYS) == knobs - {"request_timeout_s"} | {"engine_request_timeout_s"}

    s = AppSettings.from_args({
        "adapter_weights": {"sql": 2, "": 0.5}, "adapter_source_roots": ["/srv/a", " "], "max_queue_wait_s": None,
        "engine_request_timeout_s": 300, "max_waiting_per_adapter": 16, "kv_cache_bytes": 5.12e8,
        "load_format": "dummy", "adapter_failure_ttl_s": 5, "scheduling_policy": "round_robin", "max_num_seqs": None,
    }, env={})
    config = s.engine_config("m", ())
    assert config.adapter_weights == {"sql": 2.0, "": 0.5} and config.adapter_source_roots == ("/srv/a",)
    assert config.max_queue_wait_s is None  # null turns the deadline off
    assert config.request_timeout_s == 300.0 and s.request_timeout_s == 60.0  # the engine's; the ingress's stays
    assert config.kv_cache_bytes == 512_000_000 and isinstance(config.kv_cache_bytes, int)
    assert config.max_num_seqs == 64  # null: the engine's default
    assert (config.load_format, config.adapter_failure_ttl_s, config.scheduling_policy) == ("dummy", 5.0, "round_robin")
    assert AppSettings.from_args({"adapter_weights": "a=2,b=1"}, env={}).engine["adapter_weights"] == {"a": 2.0, "b": 1.0}
    assert AppSettings.from_args({}, env={}).engine_config("m", ()).max_queue_wait_s == 60.0

    for args, needle in [({"preload_adapters": "no"}, "preload_adapters must be true or false"),
                         ({"max_waiting_per_adapter": "8"}, "max_waiting_per_adapter must be an integer"),
                         ({"max_queue_wait_s": "5s"}, "max_queue_wait_s must be a number"),
                         ({"max_queue_wait_s": 0}, "max_queue_wait_s must be a number of seconds > 0"),
                         ({"engine_request_timeout_s": -1}, "engine_request_timeout_s must be"),
                         ({"adapter_weights": "a=0"}, "adapter_weights"),
                         ({"adapter_weights": {"a": "heavy"}}, "adapter_weights['a']"),
                         ({"scheduling_policy": "lifo"}, "scheduling_policy must be one of"),
                         ({"adapter_load_timeout_s": None}, None)]:
        if needle is None:  # null for a knob that cannot be off: the engine's default
            assert AppSettings.from_args(args, env={}).engine_config("m", ()).adapter_load_timeout_s == 60.0
            continue
        with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
            AppSettings.from_args(args, env={})


def test_config_yaml_args_parse() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for app in config["applications"]:
        s = AppSettings.from_args(app["args"], env={})
        cfg = s.engine_config("m", ())
        assert cfg.scheduling_policy == "fair" and cfg.max_queue_wait_s == 60.0 and cfg.request_timeout_s is None
        assert cfg.max_waiting_per_adapter is not None and cfg.adapter_load_timeout_s == 60.0


def test_launcher_flags_for_fair_sharing() -> None:
    from serve_app.__main__ import parse_args

    app_args, _ = parse_args(["--scheduling-policy", "fair", "--adapter-weights", "sql=2,chat=1",
                              "--max-waiting-per-adapter", "32", "--max-waiting-slack", "8", "--max-queue-wait-s", "20",
                              "--engine-request-timeout-s", "120", "--adapter-load-timeout-s", "30",
                              "--refusal-hold-s", "0.5"])
    settings = AppSettings.from_args(app_args, env={})
    assert settings.refusal_hold_s == 0.5
    config = settings.engine_config("m", ())
    assert config.adapter_weights == {"sql": 2.0, "chat": 1.0}
    assert (config.max_waiting_per_adapter, config.max_waiting_slack, config.max_queue_wait_s) == (32, 8, 20.0)
    assert (config.request_timeout_s, config.adapter_load_timeout_s) == (120.0, 30.0)
    for bad in (-1, 61, "soon", True):
        with pytest.raises(ValueError, match="refusal_hold_s"):
            AppSettings.from_args({"refusal_hold_s": bad}, env={})


def test_serve_limits_cover_the_engine_bounds() -> None:
    from serve_app.app import deployment_options

    settings = AppSettings.from_args({"max_num_seqs": 8, "max_waiting": 64, "max_waiting_per_adapter": 8,
                                      "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, env={})
    config = settings.engine_config("m", ())
    model, ingress = deployment_options(settings, config.max_num_seqs, config.max_waiting, config.waiting_slack)
    # A replica takes everything its engine may hold (running, waiting, the slack beyond max_waiting), so
    # the engine decides every admission; Serve's queue only for when every replica is full.
    assert model["max_ongoing_requests"] > 8 + 64 + config.waiting_slack
    assert model["max_queued_requests"] == 64
    assert ingress["max_ongoing_requests"] >= 3 * model["max_ongoing_requests"]


# ---- metrics -------------------------------------------------------------------------------------
def test_per_adapter_metric_families_and_their_label_bound() -> None:
    n = ADAPTER_LABELS_NAMED + 4
    accounts = {("" if i == 0 else f"a{i}"): {"weight": 2.0 if i == 1 else 1.0, "service": 10.0 * i,
                                              "prefill_tokens": 5, "decode_tokens": 7, "admitted": 2, "rejected": 1,
                                              "queue_timeouts": i % 2, "request_timeouts": 0, "queue_wait_s_sum": 0.5,
                                              "queue_wait_s_max": 0.4} for i in range(n)}
    metrics = ReplicaMetrics()
    for i in range(n):
        metrics.record(f"a{i}", "ok", prompt_tokens=3, generated_tokens=4, ttft=0.02)
    snap = {"replica": "r1", "metrics": metrics.snapshot(),
            "engine": {"fairness": accounts, "scheduling_policy": "fair", "waiting": {}, "running": {}}}
    text = render_prometheus([snap], {}).decode()

    rejected = samples(text, "loraserve_adapter_rejections_total")
    assert rejected[(("adapter", "__base__"), ("reason", "overloaded"))] == 1
    assert rejected[(("adapter", "a1"), ("reason", "queue_timeout"))] == 1
    folded = n - ADAPTER_LABELS_NAMED  # past the bound: one label, the counters summed
    assert rejected[(("adapter", OTHER_ADAPTERS_LABEL), ("reason", "overloaded"))] == folded
    assert len({labels[0] for labels in rejected}) == ADAPTER_LABELS_NAMED + 1
    tokens = samples(text, "loraserve_adapter_scheduled_tokens_total")
    assert tokens[(("adapter", OTHER_ADAPTERS_LABEL), ("phase", "decode"))] == 7 * folded
    wait = samples(text, "loraserve_adapter_queue_wait_seconds_count")
    assert wait[(("adapter", "a1"),)] == 2 and wait[(("adapter", OTHER_ADAPTERS_LABEL),)] == 2 * folded
    assert samples(text, "loraserve_adapter_queue_wait_seconds_sum")[(("adapter", "a1"),)] == 0.5
    assert samples(text, "loraserve_adapter_queue_wait_max_seconds")[(("adapter", "a1"),)] == 0.4
    service = samples(text, "loraserve_adapter_service")
    assert service[(("adapter", "a3"),)] == 30.0 and len(service) == ADAPTER_LABELS_NAMED  # gauges: named only
    assert samples(text, "loraserve_adapter_weight")[(("adapter", "a1"),)] == 2.0

    ttft = samples(text, "loraserve_adapter_time_to_first_token_seconds_count")
    assert ttft[(("adapter", "a0"),)] == 1 and ttft[(("adapter", OTHER_ADAPTERS_LABEL),)] == n - ADAPTER_LABELS_NAMED
    assert len(ttft) == ADAPTER_LABELS_NAMED + 1
    assert samples(text, "loraserve_time_to_first_token_seconds_count")[()] == n


# ---- the noisy-neighbour load test's report ------------------------------------------------------
def test_noisy_report_from_synthetic_events(tmp_path: Path) -> None:
    from loadtests.run_loadtest import Run, write_report
    from loadtests.scenarios.noisy import ROLES

    role = {r.name: r for r in ROLES}
    requests: list[dict[str, Any]] = []

    def add(name: str, rel: float, status: int, ttft: float | None, latency: float, tokens: int = 0) -> None:
        requests.append({"event": "request", "t": 1000.0 + rel, "rel": rel, "kind": "generate_stream",
                         "adapter": role[name].adapter, "status": status, "error": None if status == 200 else str(status),
                         "latency_s": latency, "ttft_s": ttft, "tokens": tokens})

    for i in range(100):  # 100 s: alone 0-30 s (measured 5-30), floods 30-100 s (measured 40-100)
        rel = float(i)
        for light in ("B", "C"):
            add(light, rel, 200, 0.05 if rel < 30 else 0.08, 0.2, 24)
        if rel >= 30:
            add("A1", rel, 200, 1.0, 2.0, 16)
            add("A1", rel + 0.5, 429, None, 0.02)
            add("A2", rel + 0.5, 429, None, 0.3 if i == 99 else 0.04)
    fairness = [(t, {role["A1"].adapter: {"prefill_tokens": 100.0 * t, "decode_tokens": 0.0},
                     role["A2"].adapter: {"prefill_tokens": 0.0, "decode_tokens": 100.0 * t}}) for t in (40.0, 100.0)]
    run = Run(1000.0, 100.0, requests, [(float(t), 1, 0.0) for t in range(100)], fairness, [(50.0, 429, 0.01)])
    summary = write_report(run, "noisy", tmp_path)

    flood = summary["noisy"]["phases"]["flood"]
    assert flood["window_s"] == [40.0, 100.0] and summary["noisy"]["phases"]["alone"]["window_s"] == [5.0, 30.0]
    assert flood["roles"]["A1"]["requests"] == 120 and flood["roles"]["A1"]["refused"] == 60
    assert flood["roles"]["B"]["ttft_p95_s"] == pytest.approx(0.08)
    assert flood["roles"]["A2"]["weighted_share"] == pytest.approx(2 / 3, abs=1e-4)  # 2 x decode vs 1 x prefill
    bars = {b["bar"].split(" ")[0] + (" ttft" if "TTFT" in b["bar"] else ""): b for b in summary["noisy"]["bars"]}
    assert bars["B ttft"]["value"] == pytest.approx(1.6) and bars["B ttft"]["met"]
    assert bars["B"]["value"] == 0 and bars["B"]["met"]
    refusal = next(b for b in summary["noisy"]["bars"] if "refusals" in b["bar"])
    assert refusal["met"] and "a single client beside locust: p50 10.0" in refusal["detail"]
    assert next(b for b in summary["noisy"]["bars"] if b["bar"].startswith("A2 : A1"))["value"] == 2.0
    md = (tmp_path / "summary.md").read_text()
    assert "## Noisy neighbours" in md and "| A1 | flood (40–100 s) | qv-r4 | 1 |" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") == 2 and "refusal_latency.png" in html
    for name in ("ttft_by_role.png", "requests_by_role.png", "refusal_latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
