"""The HTTP layer without Ray: the same Starlette app the Serve ingress runs, over an in-process engine.

Covers the TGI and OpenAI schemas, every validation error's status and shape, metrics rendering,
stream cancellation, settings parsing, the demo builder and the deployment options. The real
`serve run config.yaml` end-to-end tests are in test_serve_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig, SamplingParams
from models.demo import DEMO_ADAPTERS, build_demo, demo_adapter_specs
from serve_app.backends import LocalBackend
from serve_app.core import ReplicaCore
from serve_app.http_app import create_app
from serve_app.settings import AppSettings

PROMPT = "The quick brown fox"
ADAPTERS = [a[0] for a in DEMO_ADAPTERS]


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("loraserve-cache"))


def _core(demo_dir: Path, **overrides: Any) -> ReplicaCore:
    config = EngineConfig(model=str(demo_dir / "base"), adapters=demo_adapter_specs(demo_dir), num_kv_blocks=256,
                          max_model_len=512, **overrides)
    return ReplicaCore(config, "demo")


@pytest.fixture(scope="module")
def core(demo_dir: Path) -> Iterator[ReplicaCore]:
    c = _core(demo_dir)
    yield c
    c.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Http:
    """httpx over the ASGI app, one event loop per call (the engine serves any caller's loop)."""

    def __init__(self, core: ReplicaCore) -> None:
        self.app = create_app(LocalBackend(core))

    async def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.request(method, url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return run(self._request("POST", url, **kw))

    def get(self, url: str) -> httpx.Response:
        return run(self._request("GET", url))


@pytest.fixture(scope="module")
def http(core: ReplicaCore) -> Http:
    return Http(core)


def reference(core: ReplicaCore, prompt: str | list[int], adapter: str | None, n: int, **params: Any) -> Any:
    """The engine's own greedy output for the same request (the oracle for every HTTP answer)."""
    return run(core.engine.complete(prompt, SamplingParams(max_new_tokens=n, **params), adapter_id=adapter))


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_idle(core: ReplicaCore, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = core.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0:
            break
        time.sleep(0.02)
    core.engine.check_idle_invariants()


# ---- TGI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "qv-r4", "all-r32"])
def test_generate_details_match_engine(http: Http, core: ReplicaCore, adapter: str | None) -> None:
    params: dict[str, Any] = {"max_new_tokens": 12, "details": True, "decoder_input_details": True, "top_n_tokens": 3}
    if adapter:
        params["adapter_id"] = adapter
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = reference(core, PROMPT, adapter, 12)
    assert body["generated_text"] == ref.generated_text
    d = body["details"]
    assert d["finish_reason"] == ref.finish_reason
    assert d["generated_tokens"] == ref.generated_tokens == len(d["tokens"])
    assert [t["id"] for t in d["tokens"]] == list(ref.token_ids)
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in d["tokens"])
    assert len(d["top_tokens"]) == len(d["tokens"]) and all(len(t) == 3 for t in d["top_tokens"])
    # The chosen (greedy) token is the most likely alternative.
    assert [t[0]["id"] for t in d["top_tokens"]] == [t["id"] for t in d["tokens"]]
    prefill = d["prefill"]
    assert len(prefill) == int(r.headers["x-prompt-tokens"])
    assert prefill[0]["logprob"] is None and all(isinstance(t["logprob"], float) for t in prefill[1:])
    assert d["seed"] is None  # greedy


def test_generate_without_details_and_full_text(http: Http, core: ReplicaCore) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "mlp-r16"}})
    assert r.status_code == 200
    ref = reference(core, PROMPT, "mlp-r16", 6)
    assert r.json() == {"generated_text": ref.generated_text}
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "mlp-r16",
                                                                      "return_full_text": True}})
    assert r.json()["generated_text"] == PROMPT + ref.generated_text
    # The base model's public name means the base model, as in TGI.
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "demo"}})
    assert r.json()["generated_text"] == reference(core, PROMPT, None, 6).generated_text


def test_compat_route_dispatches_on_stream(http: Http, core: ReplicaCore) -> None:
    ref = reference(core, PROMPT, "o-r2", 5)
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "adapter_id": "o-r2"}})
    assert r.status_code == 200 and r.json() == [{"generated_text": ref.generated_text}]
    r = http.post("/", json={"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 5, "adapter_id": "o-r2"}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1]["generated_text"] == ref.generated_text


def test_generate_stream_events(http: Http, core: ReplicaCore) -> None:
    params = {"max_new_tokens": 10, "adapter_id": "attn-r8", "details": True, "top_n_tokens": 2}
    r = http.post("/generate_stream", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200
    events = sse_events(r.text)
    ref = reference(core, PROMPT, "attn-r8", 10)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert [e["token"]["id"] for e in events] == list(ref.token_ids)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == ref.generated_text
    assert last["details"] == {"finish_reason": ref.finish_reason, "generated_tokens": ref.generated_tokens,
                               "seed": None, "input_length": ref.prompt_tokens}
    assert all(len(e["top_tokens"]) == 2 for e in events)
    if ref.finish_reason == "length":  # streamed texts add up to the generated text
        assert "".join(e["token"]["text"] for e in events) == ref.generated_text


def test_stop_sequences_tgi_keeps_openai_cuts(http: Http, core: ReplicaCore) -> None:
    full = reference(core, PROMPT, "qv-r4", 24).generated_text
    stop = full[6:8]
    at = full.find(stop)
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "adapter_id": "qv-r4",
                                                                      "stop": [stop], "details": True}})
    body = r.json()
    assert body["generated_text"] == full[: at + len(stop)]
    assert body["details"]["finish_reason"] == "stop_sequence"
    r = http.post("/v1/completions", json={"model": "qv-r4", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                           "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:at] and choice["finish_reason"] == "stop"


def test_sampling_with_seed_is_reproducible(http: Http) -> None:
    params = {"max_new_tokens": 8, "adapter_id": "qv-r4", "do_sample": True, "temperature": 0.8, "top_k": 20,
              "seed": 1234, "details": True}
    a = http.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    b = http.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert a == b and a["details"]["seed"] == 1234


# ---- errors --------------------------------------------------------------------------------------
LONG_PROMPT = "word " * 2000  # far beyond max_model_len=512

TGI_ERRORS: list[tuple[str, Any, int, str]] = [
    ("/generate", {"inputs": ""}, 422, "inputs"),
    ("/generate", {"parameters": {}}, 422, "inputs"),
    ("/generate", {"inputs": 3}, 422, "inputs"),
    ("/generate", ["not", "an", "object"], 422, "JSON object"),
    ("/generate", {"inputs": "x", "parameters": "nope"}, 422, "parameters"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "a"}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**9}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": True}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -1.0}}, 422, "temperature"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": 0}}, 422, "temperature"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": 0}}, 422, "top_k"),
    ("/generate", {"inputs": "x", "parameters": {"repetition_penalty": -2}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "x", "parameters": {"frequency_penalty": 5}}, 422, "frequency_penalty"),
    ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": 99}}, 422, "top_n_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"seed": -1}}, 422, "seed"),
    ("/generate", {"inputs": "x", "parameters": {"stop": "x"}}, 422, "stop"),
    ("/generate", {"inputs": "x", "parameters": {"stop": [""]}}, 422, "stop"),
    ("/generate", {"inputs": "x", "parameters": {"truncate": 0}}, 422, "truncate"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": {}}}}, 422, "grammar"),
    ("/generate", {"inputs": "x", "parameters": {"watermark": True}}, 422, "watermark"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, 422, "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"no_such_thing": 1}}, 422, "no_such_thing"),
    ("/generate", {"inputs": "x", "extra": 1}, 422, "extra"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "nope"}}, 422, "unknown adapter"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": 5}}, 422, "adapter_id"),
    ("/generate", {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 4}}, 422, "inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}}, 422, "decoder_input_details"),
    ("/generate_stream", {"inputs": "x", "parameters": {"adapter_id": "nope"}}, 422, "unknown adapter"),
    ("/generate_stream", {"inputs": LONG_PROMPT}, 422, "inputs"),
    ("/", {"inputs": "x", "stream": "yes"}, 422, "stream"),
]


@pytest.mark.parametrize(("route", "body", "status", "needle"), TGI_ERRORS)
def test_tgi_errors(http: Http, route: str, body: Any, status: int, needle: str) -> None:
    r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation"
    assert needle in err["error"]


@pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe", b"null"])
def test_tgi_malformed_bodies(http: Http, raw: bytes) -> None:
    r = http.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_truncate_keeps_the_prompt_tail(http: Http, core: ReplicaCore) -> None:
    # Over the token limit (512) but within the character limit (512 x 8) that is checked before tokenizing.
    prompt = "word " * 700
    assert len(core.engine.tokenize(prompt)) > 512 and len(prompt) <= core.max_input_chars
    r = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 4, "truncate": 16,
                                                                      "details": True}})
    assert r.status_code == 200, r.text
    ids = core.engine.tokenize(prompt)[-16:]
    assert r.json()["generated_text"] == run(core.engine.complete(ids, SamplingParams(max_new_tokens=4))).generated_text


OPENAI_ERRORS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", {"prompt": "", "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope", "stream": True},
     404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), OPENAI_ERRORS)
def test_openai_errors(http: Http, route: str, body: Any, status: int, param: str | None) -> None:
    r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"
    r = http.post(route, content=b"{oops")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods(http: Http) -> None:
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = http.get("/generate")
    assert r.status_code == 405 and "error" in r.json()
    r = http.get("/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_overload_is_429_and_recovers(demo_dir: Path) -> None:
    core = _core(demo_dir, max_num_seqs=1, max_waiting=1)
    http = Http(core)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=http.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}}
            return list(await asyncio.gather(*[client.post("/generate", json=body) for _ in range(6)]))

    try:
        codes = sorted(r.status_code for r in run(burst()))
        assert 429 in codes and 200 in codes, codes
        r429 = next(r for r in run(burst()) if r.status_code == 429)
        assert r429.json()["error_type"] == "overloaded"
        wait_idle(core)
        assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 200
        oa = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert oa.status_code == 200
    finally:
        core.shutdown()


# ---- OpenAI --------------------------------------------------------------------------------------
def test_openai_completions(http: Http, core: ReplicaCore) -> None:
    ref = reference(core, PROMPT, "qv-down-r8", 9)
    body = {"model": "qv-down-r8", "prompt": PROMPT, "max_tokens": 9, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "qv-down-r8"
    assert out["choices"][0]["text"] == ref.generated_text
    assert out["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 9,
                            "total_tokens": ref.prompt_tokens + 9}
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}).text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.generated_text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 9
    # token-id prompts and echo
    ids = core.engine.tokenize(PROMPT)
    r = http.post("/v1/completions", json={**body, "prompt": ids})
    assert r.json()["choices"][0]["text"] == ref.generated_text
    r = http.post("/v1/completions", json={**body, "echo": True})
    assert r.json()["choices"][0]["text"] == PROMPT + ref.generated_text


def test_openai_completion_logprobs(http: Http) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(len(t) <= 2 for t in lp["top_logprobs"])


def test_openai_chat(http: Http, core: ReplicaCore) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    tok = core.engine.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    ref = reference(core, list(tok.encode(text, add_special_tokens=False)), "kv-up-r16-l01", 7)
    body = {"model": "kv-up-r16-l01", "messages": messages, "max_tokens": 7, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    out = http.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["message"] == {"role": "assistant",
                                                                          "content": ref.generated_text}
    assert len(choice["logprobs"]["content"]) == 7
    events = sse_events(http.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == ref.generated_text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_info_health(http: Http) -> None:
    models = http.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "demo" and sorted(ids[1:]) == sorted(ADAPTERS)
    assert all(m["parent"] == "demo" for m in models["data"][1:])
    info = http.get("/info").json()
    assert info["model_id"] == "demo" and info["max_total_tokens"] == 512
    assert {a["id"] for a in info["adapters"]} == set(ADAPTERS)
    assert http.get("/health").status_code == 200


def test_metrics_exposition(http: Http) -> None:
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "adapter_id": "o-r2"}})
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("loraserve_requests", "loraserve_generated_tokens", "loraserve_time_to_first_token_seconds",
                 "loraserve_time_per_output_token_seconds", "loraserve_queue_length", "loraserve_running_batch_size",
                 "loraserve_kv_blocks_used", "loraserve_kv_blocks_free", "loraserve_batch_size",
                 "loraserve_http_requests"):
        assert name in families, name
    reqs = {(s.labels["adapter"], s.labels["status"]): s.value for s in families["loraserve_requests"].samples
            if s.name.endswith("_total")}
    assert reqs[("o-r2", "ok")] >= 1 and reqs[("__unknown__", "invalid")] >= 1
    tokens = {s.labels["adapter"]: s.value for s in families["loraserve_generated_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens["o-r2"] >= 3
    kv_free = next(s.value for s in families["loraserve_kv_blocks_free"].samples)
    assert kv_free == 256


# ---- cancellation --------------------------------------------------------------------------------
def test_closing_a_stream_aborts_and_frees_kv(core: ReplicaCore) -> None:
    async def go() -> int:
        before: int = core.engine.stats().aborted
        chunks: AsyncIterator[list[dict[str, Any]]] = core.stream(
            {"prompt": PROMPT, "adapter_id": "mlp-r16", "params": {"max_new_tokens": 400}})
        got = 0
        async for chunk in chunks:
            got += len(chunk)
            if got >= 3:
                break
        assert core.engine.stats().kv_blocks_used > 0
        await chunks.aclose()  # what the ingress does when the client disconnects
        return before

    before = run(go())
    wait_idle(core)  # the engine applies the abort at its next step
    assert core.engine.stats().aborted == before + 1


@pytest.mark.parametrize(("rate", "coalesced"), [(0.0, False), (5.0, True)])
def test_stream_chunking_respects_the_message_budget(demo_dir: Path, rate: float, coalesced: bool) -> None:
    core = _core(demo_dir)
    core.stream_messages_per_s = rate  # 5/s: one stream may send a chunk every 200 ms

    async def go() -> list[list[dict[str, Any]]]:
        return [chunk async for chunk in core.stream({"prompt": PROMPT, "adapter_id": "qv-r4",
                                                      "params": {"max_new_tokens": 60}})]

    try:
        ref = reference(core, PROMPT, "qv-r4", 60)
        chunks = run(go())
        deltas = [d for c in chunks for d in c]
        assert [d["token"]["id"] for d in deltas] == list(ref.token_ids)
        assert "".join(d["text"] for d in deltas) == ref.generated_text and deltas[-1]["finished"]
        if coalesced:
            assert len(chunks) < len(deltas) / 2
        else:  # a chunk per token, unless this process was too busy to pick each one up on its own
            assert len(chunks) > 1
        assert core.snapshot()["metrics"]["stream_deltas"] == len(deltas)
    finally:
        core.shutdown()


# ---- settings, demo, app builder -----------------------------------------------------------------
def test_settings_parsing() -> None:
    s = AppSettings.from_args({"model_id": "some/model", "lora_adapters": "a=/x,b", "max_total_tokens": 256,
                               "max_batch_size": 8, "num_replicas": 2}, env={})
    assert s.model == "some/model" and [(a.adapter_id, a.source) for a in s.adapters] == [("a", "/x"), ("b", "b")]
    assert s.engine == {"max_model_len": 256, "max_num_seqs": 8} and s.model_replicas == 2
    s = AppSettings.from_args({"adapters": ["c=/c", {"id": "d", "path": "/d"}]}, env={"LORA_ADAPTERS": "z=/z"})
    assert [a.adapter_id for a in s.adapters] == ["c", "d"]
    s = AppSettings.from_args({"adapters": ""}, env={"LORA_ADAPTERS": "z=/z,y=/y"})
    assert [a.adapter_id for a in s.adapters] == ["z", "y"]
    # A second application on another base (config.yaml's zoo) opts out of LORA_ADAPTERS.
    s = AppSettings.from_args({"adapters_from_env": False}, env={"LORA_ADAPTERS": "z=/z"})
    assert s.adapters == ()
    with pytest.raises(ValueError, match="adapters_from_env"):
        AppSettings.from_args({"adapters_from_env": "no"}, env={})
    with pytest.raises(ValueError, match="unknown app argument"):
        AppSettings.from_args({"modle": "demo"}, env={})
    with pytest.raises(ValueError, match="dtype"):
        AppSettings.from_args({"dtype": "float8"}, env={})
    with pytest.raises(ValueError, match="max_num_seqs"):
        AppSettings.from_args({"max_num_seqs": 0}, env={})


def test_demo_build_is_idempotent_under_concurrency(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_demo(tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    built = results[0]
    assert json.loads((built / "manifest.json").read_text())["adapters"] == ADAPTERS
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo") and not p.name.endswith(".lock")]
    assert leftovers == []
    mtime = (built / "base" / "model.safetensors").stat().st_mtime
    assert build_demo(tmp_path) == built and (built / "base" / "model.safetensors").stat().st_mtime == mtime


def test_deployment_options_and_builder(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import Application

    from serve_app.__main__ import parse_args
    from serve_app.app import build_app, deployment_options

    cpu = AppSettings.from_args({"max_num_seqs": 8, "max_waiting": 32}, env={})
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    model, ingress = deployment_options(cpu, 8, 32)
    # The engine's OpenMP defaults reach the replica processes (engine/openmp_env.py) ...
    assert model["ray_actor_options"] == {
        "num_cpus": 1.0, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}}}
    assert model["num_replicas"] == 1
    # ... unless the environment sets them itself (the workers inherit it).
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert deployment_options(cpu, 8, 32)[0]["ray_actor_options"] == {"num_cpus": 1.0}
    assert model["max_ongoing_requests"] >= 8 + 32 and model["max_queued_requests"] == 32
    assert ingress["ray_actor_options"] == {"num_cpus": 0} and ingress["max_ongoing_requests"] >= 40
    gpu = AppSettings.from_args({"device": "cuda", "model_replicas": 2}, env={})
    model, _ = deployment_options(gpu, 64, 1024)
    assert model["ray_actor_options"]["num_gpus"] == 1.0 and model["num_replicas"] == 2

    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(demo_dir.parent))
    assert isinstance(build_app({"model": "demo", "max_model_len": 256}), Application)

    app_args, opts = parse_args(["--model-id", "demo", "--lora-adapters", "a=/a", "--max-total-tokens", "300",
                                 "--port", "9000", "--hostname", "127.0.0.1"])
    assert app_args == {"model": "demo", "adapters": "a=/a", "max_model_len": 300, "route_prefix": "/"}
    assert opts.port == 9000 and opts.host == "127.0.0.1"
    assert AppSettings.from_args(app_args, env={}).engine["max_model_len"] == 300
