"""End to end: the real `serve run config.yaml` in a subprocess, real clients, unmodified.

One Serve instance for the whole module (starting Ray Serve costs most of this module's time). It
runs the repository's config.yaml's default application with the HTTP port changed and the model
swapped for the random-weight demo model (8 adapters of different shapes, fast enough for the many
requests here), with its own Ray temp dir and demo-model cache; teardown stops it with Ctrl-C (as a
user would) and then makes sure no process of that Ray instance is left. config.yaml unchanged
(SmolLM2 + showcase adapters at /, the zoo at /zoo) is started in tests/test_config_yaml.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine, RequestOutput, SamplingParams
from models.demo import DEMO_ADAPTERS, build_demo, demo_adapter_specs
from serve_app.settings import AppSettings
from tests.ray_serve_helpers import REPO, free_port, python_path_with_repo, stop_ray_launcher, wait_healthy

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]

ADAPTERS = [a[0] for a in DEMO_ADAPTERS]
PROMPT = "The quick brown fox"
STARTUP_TIMEOUT_S = 300.0
ADMIN_TOKEN = "e2e-admin-token"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    app_args: dict[str, Any]
    demo_dir: Path


def _serve_executable() -> list[str]:
    # The `serve` console script of this interpreter's environment (not whatever is first on PATH).
    script = Path(sys.executable).parent / "serve"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]


@contextlib.contextmanager
def _serve_run(config: dict[str, Any], tmp: Path, env_extra: dict[str, str], health_paths: list[str],
               timeout_s: float) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`serve run` `config` (its port rewritten to a free one) until every health path answers; yields
    (url, process, log). On exit: Ctrl-C, and the test fails if a process of its Ray instance survives.

    Ray gets a short private temp dir: it isolates this instance (sockets, logs) from any other Ray on
    the machine and identifies its processes at teardown (short because of the UNIX socket path limit).
    """
    port = free_port()
    config["http_options"]["port"] = port
    assert config["http_options"]["host"] == "127.0.0.1"
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="lsrv", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LORA_ADAPTERS")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", **env_extra,
               PYTHONPATH=python_path_with_repo(env.get("PYTHONPATH")))
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_serve_executable(), "run", str(config_path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, log, [url + p for p in health_paths], timeout_s)
        yield url, proc, log
    finally:
        leftovers = stop_ray_launcher(proc, ray_tmp)
        assert not leftovers, f"processes of the test's Ray instance survived: {leftovers}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-e2e")
    cache = tmp / "cache"
    demo_dir = build_demo(cache)  # built here once; `serve run` finds it through LORASERVE_CACHE_DIR
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["applications"] = config["applications"][:1]
    config["applications"][0]["args"]["model"] = "demo"
    app_args = dict(config["applications"][0]["args"])  # what the reference engine is built from
    # The adapter admin API (off in config.yaml), on with the token from the environment, as an
    # operator would switch it on; sources limited to the demo's adapter directory.
    config["applications"][0]["args"].update(admin_enabled=True, adapter_source_roots=[str(demo_dir / "adapters")])
    env = {"LORASERVE_CACHE_DIR": str(cache), "LORASERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    with _serve_run(config, tmp, env, ["/health"], STARTUP_TIMEOUT_S) as (url, proc, log):
        yield Server(url, proc, log, app_args, demo_dir)


@pytest.fixture(scope="module")
def ref_engine(server: Server) -> Iterator[Engine]:
    """An in-process Engine over the same demo directory and the same engine settings as config.yaml."""
    settings = AppSettings.from_args(server.app_args, env={})
    engine = Engine(settings.engine_config(str(server.demo_dir / "base"), demo_adapter_specs(server.demo_dir)))
    yield engine
    engine.shutdown()


def complete(engine: Engine, prompt: str | list[int], adapter: str | None, n: int) -> RequestOutput:
    return asyncio.run(engine.complete(prompt, SamplingParams(max_new_tokens=n), adapter_id=adapter))


def chat_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


def metric_samples(url: str) -> dict[str, list[Any]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def request_counts(url: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for s in metric_samples(url)["loraserve_requests"]:
        if s.name.endswith("_total"):
            key = (s.labels["adapter"], s.labels["status"])
            counts[key] = counts.get(key, 0.0) + s.value
    return counts


def sse_events(lines: list[str]) -> list[Any]:
    return [json.loads(line[5:]) for line in lines if line.startswith("data:") and line.strip() != "data: [DONE]"]


# ---- 1. real clients, greedy outputs equal the in-process engine's ------------------------------
@pytest.mark.parametrize("adapter", [None, "qv-r4", "all-r32", "kv-up-r16-l01"])
def test_inference_client_matches_engine(server: Server, ref_engine: Engine, adapter: str | None) -> None:
    client = InferenceClient(server.url)
    ref = complete(ref_engine, PROMPT, adapter, 16)

    out = client.text_generation(PROMPT, adapter_id=adapter, max_new_tokens=16, details=True)
    assert out.generated_text == ref.generated_text
    assert [t.id for t in out.details.tokens] == list(ref.token_ids)
    assert out.details.finish_reason == ref.finish_reason
    assert out.details.generated_tokens == ref.generated_tokens

    stream = list(client.text_generation(PROMPT, adapter_id=adapter, max_new_tokens=16, details=True, stream=True))
    assert [s.token.id for s in stream] == list(ref.token_ids)
    assert stream[-1].generated_text == ref.generated_text
    assert stream[-1].details is not None and stream[-1].details.finish_reason == ref.finish_reason

    text = "".join(client.text_generation(PROMPT, adapter_id=adapter, max_new_tokens=16, stream=True))
    if ref.finish_reason == "length":
        assert text == ref.generated_text
    assert client.text_generation(PROMPT, adapter_id=adapter, max_new_tokens=16) == ref.generated_text


def test_openai_client_matches_engine(server: Server, ref_engine: Engine) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    ref = complete(ref_engine, PROMPT, "mlp-r16", 12)
    out = client.completions.create(model="mlp-r16", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == ref.generated_text and out.usage is not None
    assert out.usage.completion_tokens == 12
    chunks = client.completions.create(model="mlp-r16", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.generated_text

    messages = [{"role": "user", "content": "Say something."}]
    ref = complete(ref_engine, chat_ids(ref_engine, messages), "attn-r8", 12)
    chat = client.chat.completions.create(model="attn-r8", messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == ref.generated_text
    assert chat.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    stream = client.chat.completions.create(model="attn-r8", messages=messages, max_tokens=12, temperature=0,  # type: ignore[arg-type]
                                            stream=True)
    assert "".join((c.choices[0].delta.content or "") for c in stream if c.choices) == ref.generated_text

    models = [m.id for m in client.models.list()]
    assert models[0] == "demo" and sorted(models[1:]) == sorted(ADAPTERS)


def test_raw_http_routes(server: Server, ref_engine: Engine) -> None:
    ref = complete(ref_engine, PROMPT, "o-r2", 10)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "o-r2", "max_new_tokens": 10, "details": True}}
        r = http.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["generated_text"] == ref.generated_text
        assert [t["id"] for t in r.json()["details"]["tokens"]] == list(ref.token_ids)
        with http.stream("POST", "/generate_stream", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(list(r.iter_lines()))
        assert [e["token"]["id"] for e in events] == list(ref.token_ids)
        assert events[-1]["generated_text"] == ref.generated_text
        assert events[-1]["details"]["finish_reason"] == ref.finish_reason
        r = http.post("/", json=body)
        assert r.json()[0]["generated_text"] == ref.generated_text
        info = http.get("/info").json()
        assert info["model_id"] == "demo" and info["max_total_tokens"] == server.app_args["max_model_len"]
        assert {a["id"] for a in info["adapters"]} == set(ADAPTERS)
        r = http.get("/metrics")
        assert r.status_code == 200 and "loraserve_kv_blocks_free" in r.text


# ---- 2. many adapters at once: correct, batched together, counted per adapter -------------------
def test_concurrent_adapters_are_batched(server: Server, ref_engine: Engine) -> None:
    jobs: list[tuple[str, str | None]] = [(f"{PROMPT} {i}", a) for i, a in enumerate([*ADAPTERS, *ADAPTERS, None, None])]
    before = request_counts(server.url)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return list(await asyncio.gather(*[
                http.post("/generate", json={"inputs": p, "parameters": {"adapter_id": a, "max_new_tokens": 24,
                                                                         "details": True}})
                for p, a in jobs
            ]))

    responses = asyncio.run(send_all())
    for (prompt, adapter), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        ref = complete(ref_engine, prompt, adapter, 24)
        assert [t["id"] for t in r.json()["details"]["tokens"]] == list(ref.token_ids), adapter
        assert r.json()["generated_text"] == ref.generated_text

    samples = metric_samples(server.url)
    max_batch = max(s.value for s in samples["loraserve_max_batch_size"])
    assert max_batch > 1
    # The batch-size histogram has steps with more than one sequence in them.
    buckets = {s.labels["le"]: s.value for s in samples["loraserve_batch_size"] if s.name.endswith("_bucket")}
    assert buckets["+Inf"] > buckets["1.0"]
    after = request_counts(server.url)
    for adapter in ADAPTERS:
        assert after.get((adapter, "ok"), 0) - before.get((adapter, "ok"), 0) == 2, adapter
    assert after.get(("__base__", "ok"), 0) - before.get(("__base__", "ok"), 0) == 2
    tokens = {s.labels["adapter"]: s.value for s in samples["loraserve_generated_tokens"] if s.name.endswith("_total")}
    assert all(tokens.get(a, 0) >= 48 for a in ADAPTERS)
    for name in ("loraserve_time_to_first_token_seconds", "loraserve_time_per_output_token_seconds"):
        count = next(s.value for s in samples[name] if s.name.endswith("_count"))
        assert count >= len(jobs)
    assert "loraserve_queue_length" in samples and "loraserve_running_batch_size" in samples


# ---- 3. bad inputs: status code and error shape, then the server goes on ------------------------
BAD_TGI: list[tuple[str, Any, int, str]] = [
    ("/generate", {"inputs": "", "parameters": {}}, 422, "validation"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "no-such-adapter"}}, 422, "validation"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "many"}}, 422, "validation"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**7}}, 422, "validation"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -0.5}}, 422, "validation"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(["}}}, 422, "validation"),
    ("/generate", {"inputs": "word " * 3000, "parameters": {"max_new_tokens": 5}}, 422, "validation"),
    ("/generate_stream", {"inputs": "x", "parameters": {"adapter_id": "no-such-adapter"}}, 422, "validation"),
    ("/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}}, 422, "validation"),
    ("/", {"inputs": ["x"]}, 422, "validation"),
]


def test_bad_inputs_then_good_request(server: Server, ref_engine: Engine) -> None:
    from openai import BadRequestError, NotFoundError, OpenAI

    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route, body, status, error_type in BAD_TGI:
            r = http.post(route, json=body)
            assert r.status_code == status, (route, body, r.text)
            assert r.json()["error_type"] == error_type and r.json()["error"]
        r = http.post("/generate", content=b"{definitely not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        r = http.post("/v1/completions", content=b"[1, 2", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"

    client = InferenceClient(server.url)
    with pytest.raises(ValidationError, match="unknown adapter"):
        client.text_generation(PROMPT, adapter_id="no-such-adapter", max_new_tokens=4)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.text_generation(PROMPT, max_new_tokens=10**7)
    oa = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError):
        oa.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=4)
    with pytest.raises(BadRequestError):
        oa.completions.create(model="qv-r4", prompt=PROMPT, max_tokens=4, temperature=-1)

    ref = complete(ref_engine, PROMPT, "qv-rslora-r8", 8)
    assert client.text_generation(PROMPT, adapter_id="qv-rslora-r8", max_new_tokens=8) == ref.generated_text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# ---- 4. a client that goes away mid-stream frees its KV blocks ----------------------------------
def _engine_stats(url: str) -> dict[str, Any]:
    replicas = httpx.get(f"{url}/admin/stats", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["replicas"]
    assert len(replicas) == 1
    return dict(replicas[0]["engine"])


def _wait_kv_free(url: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = _engine_stats(url)
        if stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"KV blocks not freed after the client left: {stats}")
        time.sleep(0.1)


def test_admin_api_through_serve(server: Server, ref_engine: Engine) -> None:
    """The admin routes through the real ingress: the guard, and load/unload broadcast to every replica."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    source = str(server.demo_dir / "adapters" / "qv-r4")
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/adapters").status_code == 401
        assert http.post("/adapters", json={"id": "x", "source": "/etc"}, headers=auth).status_code == 403
        r = http.post("/adapters", json={"id": "qv-again", "source": source}, headers=auth)
        assert r.status_code == 200, r.text
        listing = http.get("/adapters", headers=auth).json()
        assert listing["errors"] == [] and len(listing["replicas"]) >= 1
        loaded = [a for a in listing["adapters"] if a["id"] == "qv-again"]
        assert {a["replica"] for a in loaded} == set(listing["replicas"])  # every replica has it
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "qv-again", "max_new_tokens": 8}}
        r = http.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["generated_text"] == complete(ref_engine, PROMPT, "qv-r4", 8).generated_text
        r = http.delete("/adapters/qv-again", headers=auth)
        assert r.status_code == 200, r.text
        assert "qv-again" not in {a["id"] for a in http.get("/adapters", headers=auth).json()["adapters"]}
        assert "loraserve_adapter_load_seconds_count" in http.get("/metrics").text


def test_disconnect_mid_stream_frees_kv(server: Server) -> None:
    before = request_counts(server.url)
    aborted_before = _engine_stats(server.url)["aborted"]
    streams = [
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"adapter_id": "mlp-r16", "max_new_tokens": 900}}),
        # Greedy (temperature 0): a sampled stream could reach EOS before the client leaves.
        ("/v1/completions", {"model": "mlp-r16", "prompt": PROMPT, "max_tokens": 900, "stream": True,
                             "temperature": 0}),
        ("/v1/chat/completions", {"model": "mlp-r16", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 900, "stream": True, "temperature": 0}),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route, body in streams:
            with http.stream("POST", route, json=body) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data:")
                    if seen >= 4:
                        break  # leaving the block closes the connection mid-stream
            _wait_kv_free(server.url)
        # A non-streaming request whose client times out is aborted too.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "mlp-r16",
                                                                          "max_new_tokens": 1000}}, timeout=0.5)
    stats = _wait_kv_free(server.url)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["aborted"] - aborted_before == len(streams) + 1
    samples = metric_samples(server.url)
    assert next(s.value for s in samples["loraserve_kv_blocks_used"]) == 0
    after = request_counts(server.url)
    assert after.get(("mlp-r16", "aborted"), 0) - before.get(("mlp-r16", "aborted"), 0) == len(streams) + 1
