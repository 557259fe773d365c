"""Hostile HTTP input (issue 11, points 3-5), against the in-process app over a LocalBackend.

- Malformed requests on the TGI and OpenAI routes, table-driven: each a 4xx in the route's error
  shape naming the field or the problem; and no response (any status, streamed or not, 404/405/413
  and the 500 of an internal failure included) carries a traceback, a machine path, a pid, an actor
  id or an IP address.
- Body limits hold while the body streams in (a chunked upload is cut off at the limit, counted in
  chunks consumed), admin routes included.
- The prompt character cap refuses before tokenizing, on the ingress and on the replica; tokenizing
  a big prompt runs off the replica's event loop (a blocked tokenizer does not block /health).
- Nothing private on public routes: /admin/stats behind the admin guard, adapter ids without their
  sources on /info and /v1/models, an unknown adapter's error without the other adapters' ids.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import EngineConfig
from models.demo import DEMO_ADAPTERS, build_demo, demo_adapter_specs
from serve_app.__main__ import (
    HAPROXY_ENV,
    RAY_AUTH_ENV,
    RAY_LOOPBACK_ENV,
    SERVE_THROUGHPUT_ENV,
    is_loopback,
    parse_args,
    ray_env,
)
from serve_app.admin import MAX_ADMIN_BODY, AdminConfig
from serve_app.backends import LocalBackend
from serve_app.core import INLINE_PREPARE_CHARS, ReplicaCore
from serve_app.engine_request import EngineRequest
from serve_app.errors import INTERNAL_ERROR_MESSAGE
from serve_app.http_app import create_app
from serve_app.settings import AppSettings

PROMPT = "The quick brown fox"
ADAPTERS = [a[0] for a in DEMO_ADAPTERS]
TOKEN = "hardening-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_MODEL_LEN = 512
MAX_INPUT_CHARS = MAX_MODEL_LEN * 8  # the documented default: max_model_len x CHARS_PER_TOKEN_BOUND
# What an internal failure's text may hold (a Ray task error's, say); none of it may reach a client.
LEAKY = ('Traceback (most recent call last):\n  File "/root/.pyenv/lib/python3.11/site-packages/ray/worker.py", '
         'line 1, in run\nRayTaskError(TypeError): ray::ModelReplica.generate() (pid=4242, ip=10.1.2.3, '
         'actor_id=9f8e7d6c5b4a)')


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("loraserve-cache"))


@pytest.fixture(scope="module")
def core(demo_dir: Path) -> Iterator[ReplicaCore]:
    config = EngineConfig(model=str(demo_dir / "base"), adapters=demo_adapter_specs(demo_dir), num_kv_blocks=256,
                          max_model_len=MAX_MODEL_LEN)
    c = ReplicaCore(config, "demo")
    yield c
    c.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Client:
    """httpx over an ASGI app, one event loop per call (the engine serves any caller's loop)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.request(method, url, **kw)

    def __call__(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return run(self.request(method, url, **kw))


@pytest.fixture(scope="module")
def http(core: ReplicaCore) -> Client:
    return Client(create_app(LocalBackend(core)))


@pytest.fixture(scope="module")
def admin_http(core: ReplicaCore) -> Client:
    return Client(create_app(LocalBackend(core), admin=AdminConfig(enabled=True, token=TOKEN)))


# ---- the table of malformed requests -------------------------------------------------------------
def _raw(text: str) -> dict[str, Any]:
    """A body sent as these exact bytes (json= would refuse NaN or re-encode escapes)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _json(body: Any) -> dict[str, Any]:
    return {"json": body}


def _gen(**parameters: Any) -> dict[str, Any]:
    return _json({"inputs": PROMPT, "parameters": parameters})


def _chat(**fields: Any) -> dict[str, Any]:
    return _json({"messages": [{"role": "user", "content": "Hi"}], **fields})


def _cmpl(**fields: Any) -> dict[str, Any]:
    return _json({"prompt": PROMPT, **fields})


DIGITS_5000 = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_40 = "[" * 40 + "]" * 40
TOO_LONG = "a" * (MAX_INPUT_CHARS + 1)

# (method, route, request kwargs, status, needle in the message)
TGI_BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"seed": ' + DIGITS_5000 + '}}'), 422, "seed"),
    ("POST", "/generate", _gen(seed=2**64), 422, "seed"),
    ("POST", "/generate", _gen(seed=10**30), 422, "seed"),
    ("POST", "/generate", _gen(seed=-1), 422, "seed"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"stop": ' + DEEP + '}}'), 422, "nested"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"stop": ' + DEEP_40 + '}}'), 422, "nested"),
    ("POST", "/generate", _raw('{"inputs": "\\ud800"}'), 422, "surrogate"),
    ("POST", "/generate", _raw('{"inputs": "ok \\udfff end"}'), 422, "inputs"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"\\udc00": 1}}'), 422, "surrogate"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"stop": ["\\ud800"]}}'), 422, "stop"),
    ("POST", "/generate_stream", _raw('{"inputs": "\\ud800"}'), 422, "inputs"),
    ("POST", "/generate", {"content": b'{"inputs": "x"}', "headers": {"content-type": "text/plain"}}, 415,
     "content-type"),
    ("POST", "/generate", {"content": b"inputs=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, "application/json"),
    ("POST", "/generate", _json([1, 2]), 422, "JSON object"),
    ("POST", "/generate", _json("just a string"), 422, "JSON object"),
    ("POST", "/generate", _json(42), 422, "JSON object"),
    ("POST", "/generate", _raw("null"), 422, "JSON object"),
    ("POST", "/generate", _raw(""), 422, "empty"),
    ("POST", "/generate", _raw('{"inputs": "x"'), 422, "not valid JSON"),
    ("POST", "/generate", {"content": b'{"inputs": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
     422, "UTF-8"),
    ("POST", "/generate", _json({"inputs": ["a", "b"]}), 422, "inputs"),
    ("POST", "/generate", _json({"inputs": "   "}), 422, "inputs"),
    ("POST", "/generate", _json({"inputs": ""}), 422, "inputs"),
    ("POST", "/generate", _gen(max_new_tokens=True), 422, "max_new_tokens"),
    ("POST", "/generate", _gen(max_new_tokens=1.5), 422, "max_new_tokens"),
    ("POST", "/generate", _gen(max_new_tokens=-5), 422, "max_new_tokens"),
    ("POST", "/generate", _gen(max_new_tokens=10**9), 422, "max_new_tokens"),
    ("POST", "/generate", _gen(max_new_tokens=[4]), 422, "max_new_tokens"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"temperature": NaN}}'), 422, "NaN"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"top_p": Infinity}}'), 422, "Infinity"),
    ("POST", "/generate", _raw('{"inputs": "x", "parameters": {"temperature": 1e999}}'), 422, "temperature"),
    ("POST", "/generate", _gen(top_p=1.5), 422, "top_p"),
    ("POST", "/generate", _gen(top_p=0), 422, "top_p"),
    ("POST", "/generate", _gen(stop=[f"s{i}" for i in range(17)]), 422, "stop"),
    ("POST", "/generate", _gen(stop=["x" * 1000]), 422, "stop"),
    ("POST", "/generate", _gen(stop=[1, 2]), 422, "stop"),
    ("POST", "/generate", _gen(no_such_parameter=1), 422, "no_such_parameter"),
    ("POST", "/generate", _json({"inputs": "x", **{f"k{i}": i for i in range(1000)}}), 422, "unknown request field"),
    ("POST", "/generate", _gen(details="yes"), 422, "details"),
    ("POST", "/generate", _gen(top_n_tokens=99), 422, "top_n_tokens"),
    ("POST", "/generate", _gen(best_of=True), 422, "best_of"),
    ("POST", "/", _json({"inputs": "x", "stream": "yes"}), 422, "stream"),
    ("POST", "/", _json({"inputs": "x", "stream": 1}), 422, "stream"),
    ("POST", "/generate", _gen(adapter_id=5), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id=["qv-r4"]), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="a" * 300), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="a" * 400_000), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="qv\x01r4"), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="qv-r4\n"), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="qv r4"), 422, "adapter_id"),
    ("POST", "/generate", _gen(adapter_id="no-such-adapter"), 422, "unknown adapter"),
    ("POST", "/generate_stream", _gen(adapter_id="no-such-adapter"), 422, "unknown adapter"),
    ("POST", "/generate", _json({"inputs": TOO_LONG}), 422, "max_input_chars"),
    ("POST", "/generate_stream", _json({"inputs": TOO_LONG}), 422, "max_input_chars"),
    ("POST", "/generate", _json({"inputs": "x", "parameters": {"truncate": 10, "max_new_tokens": 1}, "x": 1}), 422,
     "unknown request field"),
]

OPENAI_BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/v1/completions", _raw('{"prompt": "x", "seed": ' + DIGITS_5000 + '}'), 400, "seed"),
    ("POST", "/v1/completions", _cmpl(seed=2**64), 400, "seed"),
    ("POST", "/v1/completions", _raw('{"prompt": "\\ud800"}'), 400, "prompt"),
    ("POST", "/v1/completions", _raw('{"prompt": ' + DEEP + '}'), 400, "nested"),
    ("POST", "/v1/completions", _raw('{"prompt": "x", "temperature": NaN}'), 400, "NaN"),
    ("POST", "/v1/completions", _raw('{"prompt": "x", "top_p": -Infinity}'), 400, "Infinity"),
    ("POST", "/v1/completions", {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}}, 415,
     "content-type"),
    ("POST", "/v1/completions", _json(["x"]), 400, "JSON object"),
    ("POST", "/v1/completions", _cmpl(n=2), 400, "n"),
    ("POST", "/v1/completions", _cmpl(logprobs=True), 400, "logprobs"),
    ("POST", "/v1/completions", _cmpl(logprobs=99), 400, "logprobs"),
    ("POST", "/v1/completions", _cmpl(logprobs=-1), 400, "logprobs"),
    ("POST", "/v1/completions", _cmpl(stream="yes"), 400, "stream"),
    ("POST", "/v1/completions", _cmpl(max_tokens=-1), 400, "max_tokens"),
    ("POST", "/v1/completions", _cmpl(max_tokens=10**30), 400, "max_tokens"),
    ("POST", "/v1/completions", _cmpl(max_tokens=False), 400, "max_tokens"),
    ("POST", "/v1/completions", _cmpl(top_p=0), 400, "top_p"),
    ("POST", "/v1/completions", _cmpl(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("POST", "/v1/completions", _cmpl(model="m" * 300), 400, "model"),
    ("POST", "/v1/completions", _cmpl(model="a\tb"), 400, "model"),
    ("POST", "/v1/completions", _cmpl(model=7), 400, "model"),
    ("POST", "/v1/completions", _cmpl(model="no-such-adapter"), 404, "unknown adapter"),
    ("POST", "/v1/completions", _json({"prompt": [1, -2, 3]}), 400, "prompt"),
    ("POST", "/v1/completions", _json({"prompt": [1, 2**40]}), 400, "prompt"),
    ("POST", "/v1/completions", _json({"prompt": [1] * (MAX_MODEL_LEN + 1)}), 400, "max_model_len"),
    ("POST", "/v1/completions", _json({"prompt": TOO_LONG}), 400, "max_input_chars"),
    ("POST", "/v1/completions", _cmpl(suffix="x" * 100_000), 400, "suffix"),
    ("POST", "/v1/completions", _cmpl(unknown_field=1), 400, "unknown_field"),
    ("POST", "/v1/chat/completions", _json({"messages": [{"role": "wizard", "content": "x"}]}), 400, "role"),
    ("POST", "/v1/chat/completions", _json({"messages": [{"role": "user", "content": 5}]}), 400, "content"),
    ("POST", "/v1/chat/completions", _json({"messages": [{"role": "user"}]}), 400, "content"),
    ("POST", "/v1/chat/completions", _json({"messages": "hi"}), 400, "messages"),
    ("POST", "/v1/chat/completions", _json({"messages": [["user", "hi"]]}), 400, "messages"),
    ("POST", "/v1/chat/completions", _json({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     400, "text parts"),
    ("POST", "/v1/chat/completions", _raw('{"messages": [{"role": "user", "content": "\\udbff"}]}'), 400,
     "surrogate"),
    ("POST", "/v1/chat/completions", _json({"messages": [{"role": "user", "content": TOO_LONG}]}), 400,
     "max_input_chars"),
    ("POST", "/v1/chat/completions", _chat(logprobs="yes"), 400, "logprobs"),
    ("POST", "/v1/chat/completions", _chat(top_logprobs=50, logprobs=True), 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", _chat(n=3), 400, "n"),
    ("POST", "/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("POST", "/v1/chat/completions", _chat(stream=True, model="no-such-adapter"), 404, "unknown adapter"),
    ("POST", "/v1/chat/completions", _chat(max_completion_tokens=0), 400, "max_completion_tokens"),
]

ROUTE_BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/nope", {}, 404, "not found"),
    ("POST", "/generate/extra/path", _gen(), 404, "not found"),
    ("GET", "/v1/nope", {}, 404, "not found"),
    ("GET", "/generate", {}, 405, "method not allowed"),
    ("POST", "/health", {}, 405, "method not allowed"),
    ("DELETE", "/v1/models", {}, 405, "method not allowed"),
    ("PUT", "/v1/chat/completions", _chat(), 405, "method not allowed"),
]
ALL_BAD = TGI_BAD + OPENAI_BAD + ROUTE_BAD


def _message(route: str, r: httpx.Response) -> str:
    """The error message, after checking the route's documented error shape."""
    body = r.json()
    if route.startswith("/v1/"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert err["type"] in ("invalid_request_error", "server_error", "rate_limit_error")
        return str(err["message"])
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and isinstance(body["error_type"], str)
    return body["error"]


@pytest.mark.parametrize(("method", "route", "kwargs", "status", "needle"), ALL_BAD,
                         ids=[f"{i}-{m}-{r}" for i, (m, r, *_rest) in enumerate(ALL_BAD)])
def test_malformed_requests_get_a_4xx_naming_the_problem(http: Client, method: str, route: str,
                                                         kwargs: dict[str, Any], status: int, needle: str) -> None:
    r = http(method, route, **kwargs)
    assert r.status_code == status, r.text[:500]
    message = _message(route, r)
    assert needle in message, message
    assert len(message) < 1000  # offending values are quoted in bounded form, never whole


def test_openai_errors_name_the_param(http: Client) -> None:
    cases = [(_cmpl(seed=2**64), "seed"), (_raw('{"prompt": "\\ud800"}'), "prompt"),
             (_json({"prompt": TOO_LONG}), "prompt"), (_chat(n=3), "n"), (_cmpl(model="a\tb"), "model"),
             (_json({"messages": [{"role": "user", "content": TOO_LONG}]}), "messages")]
    for kwargs, param in cases:
        route = "/v1/chat/completions" if "messages" in str(kwargs) else "/v1/completions"
        r = http("POST", route, **kwargs)
        assert r.json()["error"]["param"] == param, (param, r.text)


def test_unknown_adapter_names_the_id_but_not_the_others(http: Client) -> None:
    for route, kwargs in [("/generate", _gen(adapter_id="tenant-x")), ("/v1/completions", _cmpl(model="tenant-x"))]:
        r = http("POST", route, **kwargs)
        message = _message(route, r)
        assert "'tenant-x'" in message and "/v1/models" in message
        assert not [a for a in ADAPTERS if a in r.text], r.text


def test_valid_unicode_and_nul_bytes_are_fine(http: Client) -> None:
    # A surrogate *pair* is a valid character (an emoji); NUL is an ordinary character to the tokenizer.
    for raw in ['{"inputs": "smile \\ud83d\\ude00", "parameters": {"max_new_tokens": 2}}',
                '{"inputs": "a\\u0000b", "parameters": {"max_new_tokens": 2}}']:
        r = http("POST", "/generate", **_raw(raw))
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["generated_text"], str)


# ---- no internals in any response ----------------------------------------------------------------
_LEAKS = [
    re.compile(r"Traceback"),
    re.compile(r"site-packages|/tmp/|/root|/home/|/usr/|/work/|\.py\b"),
    re.compile(r"\bpid\b", re.IGNORECASE),
    re.compile(r"\bactor", re.IGNORECASE),
    re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
]


def _assert_clean(text: str, where: str, extra: tuple[str, ...] = ()) -> None:
    for pattern in _LEAKS:
        assert not pattern.search(text), f"{where}: {pattern.pattern!r} in {text[:300]!r}"
    for secret in extra:
        assert secret not in text, f"{where}: {secret!r} in {text[:300]!r}"


class BrokenBackend(LocalBackend):
    """A backend whose every call fails with the kind of text a Ray task error carries."""

    async def generate(self, req: EngineRequest) -> dict[str, Any]:
        raise RuntimeError(LEAKY)

    async def stream(self, req: EngineRequest) -> AsyncIterator[list[dict[str, Any]]]:  # type: ignore[override]
        yield [{"text": "a", "token": {"id": 97, "text": "a", "logprob": -0.5, "special": False},
                "top_tokens": None, "finished": False}]
        raise RuntimeError(LEAKY)

    async def info(self) -> dict[str, Any]:
        return {}  # the routes that read it fail with a KeyError of their own: RequestGuard's case

    async def snapshots(self) -> list[dict[str, Any]]:
        raise RuntimeError(LEAKY)


def _sse_errors(text: str) -> list[Any]:
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    return [e for e in events if "error" in e]


def test_no_response_carries_internals(http: Client, core: ReplicaCore, demo_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secrets = (str(demo_dir), str(Path(__file__).resolve().parents[1]))
    checked = 0
    for method, route, kwargs, _status, _needle in ALL_BAD:  # every malformed request of the table
        r = http(method, route, **kwargs)
        _assert_clean(r.text, f"{method} {route}", secrets)
        checked += 1
    # 413s: declared and streamed
    small = Client(create_app(LocalBackend(core), max_body_bytes=1024))
    for route in ("/generate", "/v1/completions"):
        r = small("POST", route, json={"inputs": "x" * 4000, "prompt": "x"})
        assert r.status_code == 413
        _message(route, r)
        _assert_clean(r.text, f"413 {route}", secrets)
        checked += 1

    # Internal failures, from the ingress's side: a backend that raises Ray-like text.
    broken = Client(create_app(BrokenBackend(core), admin=AdminConfig(enabled=True, token=TOKEN)))
    with caplog.at_level("ERROR", logger="serve_app"):
        for method, route, kwargs, status in [
            ("POST", "/generate", _gen(max_new_tokens=2), 500),
            ("POST", "/v1/completions", _cmpl(max_tokens=2), 500),
            ("POST", "/v1/chat/completions", _chat(max_tokens=2), 500),
            ("GET", "/info", {}, 500),
            ("GET", "/v1/models", {}, 500),
            ("GET", "/admin/stats", {"headers": AUTH}, 500),
        ]:
            r = broken(method, route, **kwargs)
            assert r.status_code == status, (route, r.text)
            assert INTERNAL_ERROR_MESSAGE in _message(route, r)
            _assert_clean(r.text, f"broken {route}", secrets)
            checked += 1
        # Streams: the failure after the first token arrives in-band, as an SSE error event.
        for route, kwargs in [("/generate_stream", _gen(max_new_tokens=2)),
                              ("/v1/completions", _cmpl(max_tokens=2, stream=True, model="qv-r4")),
                              ("/v1/chat/completions", _chat(max_tokens=2, stream=True, model="qv-r4"))]:
            r = broken("POST", route, **kwargs)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            errors = _sse_errors(r.text)
            assert len(errors) == 1, r.text
            _assert_clean(r.text, f"stream {route}", secrets)
            checked += 1
    assert "4242" in caplog.text  # ... while the details went to the log

    # Internal failures on the replica's side: the tokenizer raising (as it does on a lone surrogate).
    original = core.engine.tokenize

    def failing_tokenize(prompt: str | list[int], truncate: int | None = None) -> list[int]:
        if isinstance(prompt, str):
            raise TypeError(LEAKY)
        return original(prompt, truncate)

    monkeypatch.setattr(core.engine, "tokenize", failing_tokenize)
    for route, kwargs in [("/generate", _gen(max_new_tokens=2)), ("/generate_stream", _gen(max_new_tokens=2)),
                          ("/v1/completions", _cmpl(max_tokens=2)), ("/v1/completions", _cmpl(stream=True))]:
        r = http("POST", route, **kwargs)
        assert r.status_code == 500, r.text
        assert INTERNAL_ERROR_MESSAGE in _message(route, r)
        _assert_clean(r.text, f"replica {route}", secrets)
        checked += 1
    assert checked >= 100


def test_replica_never_returns_exception_text(core: ReplicaCore) -> None:
    """The case of the issue, on the replica itself: its tokenizer fails on a lone surrogate."""
    result = run(core.generate({"request_id": "r1", "prompt": "\ud800", "params": {"max_new_tokens": 2}}))
    assert result["error"]["kind"] == "internal"
    assert result["error"]["message"] == f"{INTERNAL_ERROR_MESSAGE} (request id r1)"

    async def first_chunk() -> list[dict[str, Any]]:
        async for chunk in core.stream({"request_id": "r2", "prompt": "\ud800", "params": {"max_new_tokens": 2}}):
            return chunk
        return []

    chunk = run(first_chunk())
    assert chunk[0]["error"]["message"] == f"{INTERNAL_ERROR_MESSAGE} (request id r2)"


# ---- body size limits, while the body streams in -------------------------------------------------
class CountingBody:
    """A chunked request body (no Content-Length) that counts how many chunks the server pulled."""

    def __init__(self, chunks: int, chunk_bytes: int) -> None:
        self.total = chunks
        self.chunk = b'{"inputs": "' + b"x" * (chunk_bytes - 12)
        self.consumed = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.total):
            self.consumed += 1
            yield self.chunk


def test_chunked_oversize_body_is_refused_early(core: ReplicaCore) -> None:
    limit = 64 * 1024
    client = Client(create_app(LocalBackend(core), max_body_bytes=limit,
                               admin=AdminConfig(enabled=True, token=TOKEN)))
    chunk = 16 * 1024
    for route, headers, route_limit in [("/generate", {}, limit), ("/v1/chat/completions", {}, limit),
                                        ("/adapters", AUTH, MAX_ADMIN_BODY)]:
        body = CountingBody(chunks=4096, chunk_bytes=chunk)  # 64 MiB if it were read whole
        r = client("POST", route, content=body, headers={"content-type": "application/json", **headers})
        assert r.status_code == 413, r.text
        assert str(route_limit) in _message(route, r)
        # Read up to the limit and one chunk past it, then no more.
        assert body.consumed <= route_limit // chunk + 1, body.consumed


def test_declared_oversize_body_is_refused_before_reading(core: ReplicaCore) -> None:
    client = Client(create_app(LocalBackend(core), max_body_bytes=1000))
    body = CountingBody(chunks=10, chunk_bytes=1000)
    r = client("POST", "/generate", content=body, headers={"content-type": "application/json",
                                                            "content-length": "10000"})
    assert r.status_code == 413 and "Content-Length: 10000" in r.json()["error"]
    assert body.consumed == 0
    r = client("POST", "/generate", content=b"{}", headers={"content-length": "9" * 200})  # no int() of it
    assert r.status_code == 413


def test_body_at_the_limit_is_accepted(core: ReplicaCore) -> None:
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).encode()
    client = Client(create_app(LocalBackend(core), max_body_bytes=len(body)))
    assert client("POST", "/generate", content=body).status_code == 200
    assert client("POST", "/generate", content=body + b" ").status_code == 413


# ---- big prompts cost their sender ---------------------------------------------------------------
def test_prompt_char_cap_refuses_before_tokenizing(http: Client, core: ReplicaCore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert core.max_input_chars == MAX_INPUT_CHARS
    assert http("GET", "/info").json()["max_input_chars"] == MAX_INPUT_CHARS
    calls: list[int] = []
    original = core.engine.tokenize

    def counting(prompt: str | list[int], truncate: int | None = None) -> list[int]:
        if isinstance(prompt, str):
            calls.append(len(prompt))
        return original(prompt, truncate)

    monkeypatch.setattr(core.engine, "tokenize", counting)
    r = http("POST", "/generate", json={"inputs": "y" * 3_900_000})  # the 3.9 MB prompt: over the body limit
    assert r.status_code == 413 and "2000000 bytes" in r.json()["error"]
    r = http("POST", "/generate", json={"inputs": "y" * 1_900_000})  # within it, refused by its length
    assert r.status_code == 422 and f"at most {MAX_INPUT_CHARS} characters" in r.json()["error"]
    r = http("POST", "/generate", json={"inputs": TOO_LONG})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    assert calls == []  # refused by its length: never tokenized
    # At the limit it is tokenized (and then refused for its tokens: 4096 characters > 512 tokens).
    r = http("POST", "/generate", json={"inputs": "a " * (MAX_INPUT_CHARS // 2)})
    assert r.status_code == 422 and "max_input_chars" not in r.json()["error"], r.text
    assert calls == [MAX_INPUT_CHARS]
    # The replica applies the same rule itself (a request that did not come through this ingress).
    calls.clear()
    result = run(core.generate({"prompt": TOO_LONG, "params": {"max_new_tokens": 2}}))
    assert result["error"]["field"] == "inputs" and "max_input_chars" in result["error"]["message"]
    result = run(core.generate({"messages": [{"role": "user", "content": TOO_LONG}], "params": {}}))
    assert result["error"]["field"] == "messages"
    assert calls == []


def test_max_input_chars_setting(demo_dir: Path) -> None:
    assert AppSettings.from_args({"max_input_chars": 100}).max_input_chars == 100
    assert AppSettings.from_args({}).max_input_chars is None
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="max_input_chars"):
            AppSettings.from_args({"max_input_chars": bad})
    config = EngineConfig(model=str(demo_dir / "base"), num_kv_blocks=16, max_model_len=64)
    small = ReplicaCore(config, "demo", max_input_chars=10)
    try:
        client = Client(create_app(LocalBackend(small)))
        r = client("POST", "/v1/completions", json={"prompt": "x" * 11})
        assert r.status_code == 400 and "at most 10 characters" in r.json()["error"]["message"]
        assert client("POST", "/v1/completions", json={"prompt": "x" * 10, "max_tokens": 1}).status_code == 200
    finally:
        small.shutdown()


def test_launcher_flags_and_loopback_detection() -> None:
    app_args, _ = parse_args(["--max-input-chars", "1000", "--payload-limit", "65536"])
    assert app_args["max_input_chars"] == 1000 and app_args["max_body_bytes"] == 65536
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_launcher_ray_switches() -> None:
    """What the launcher sets up for the local Ray instance it starts: loopback only and token auth
    on a loopback host, Serve's throughput-optimized mode always, the HAProxy ingress only when asked
    (it opens ports on all interfaces); nothing for a cluster it joins, whose mode was set at start."""
    local = {SERVE_THROUGHPUT_ENV: "1", RAY_LOOPBACK_ENV: "0", RAY_AUTH_ENV: "token"}
    assert ray_env(parse_args([])[1]) == local
    assert ray_env(parse_args(["--haproxy"])[1]) == {**local, HAPROXY_ENV: "1"}
    assert ray_env(parse_args(["--hostname", "0.0.0.0"])[1]) == {SERVE_THROUGHPUT_ENV: "1"}
    assert ray_env(parse_args(["--address", "10.0.0.1:6379"])[1]) == {}
    with pytest.raises(SystemExit):
        parse_args(["--haproxy", "--address", "10.0.0.1:6379"])


def test_tokenizing_runs_off_the_event_loop(core: ReplicaCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a big (allowed) prompt is being tokenized, the same event loop answers /health."""
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    original = core.engine.tokenize
    big = "word " * (INLINE_PREPARE_CHARS // 5 + 50)  # over the inline bound, well under max_input_chars

    def slow_tokenize(prompt: str | list[int], truncate: int | None = None) -> list[int]:
        if isinstance(prompt, str) and len(prompt) == len(big):
            entered.set()
            release.wait(timeout=10)  # blocks this thread; on the event loop it would block everything
            left.set()
        return original(prompt, truncate)

    monkeypatch.setattr(core.engine, "tokenize", slow_tokenize)
    client = Client(create_app(LocalBackend(core)))

    async def scenario() -> tuple[int, bool, bool, int]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            generate = asyncio.create_task(c.post("/generate", json={"inputs": big, "parameters": {"max_new_tokens": 2,
                                                                                                   "truncate": 8}}))
            assert await asyncio.to_thread(entered.wait, 30)
            health = await c.get("/health")
            # The health answer came while the tokenizer was still blocked.
            still_blocked = not left.is_set() and not generate.done()
            small = await c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
            small_first = not left.is_set() and not generate.done()
            release.set()
            return health.status_code, still_blocked, small_first and small.status_code == 200, \
                (await generate).status_code

    health, still_blocked, small_ok, big_status = run(scenario())
    assert health == 200 and still_blocked
    assert small_ok  # a small request was served meanwhile too
    assert big_status == 200


# ---- nothing private on public routes -------------------------------------------------------------
def test_admin_stats_needs_the_admin_token(http: Client, admin_http: Client) -> None:
    r = http("GET", "/admin/stats")
    assert r.status_code == 403 and r.json()["error_type"] == "forbidden"
    assert "replicas" not in r.text
    r = admin_http("GET", "/admin/stats")
    assert r.status_code == 401 and "replicas" not in r.text
    r = admin_http("GET", "/admin/stats", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "invalid admin token"
    r = admin_http("GET", "/admin/stats", headers=AUTH)
    assert r.status_code == 200
    replicas = r.json()["replicas"]
    assert len(replicas) == 1 and "engine" in replicas[0] and "metrics" in replicas[0]


def test_public_routes_show_adapter_ids_not_sources(http: Client, demo_dir: Path) -> None:
    info = http("GET", "/info")
    assert info.status_code == 200
    assert sorted(a["id"] for a in info.json()["adapters"]) == sorted(ADAPTERS)
    assert all(set(a) == {"id", "base_model_mismatch"} for a in info.json()["adapters"])  # no sources
    models = http("GET", "/v1/models")
    data = models.json()["data"]
    assert sorted(m["id"] for m in data[1:]) == sorted(ADAPTERS)
    assert all(m["root"] == m["id"] for m in data)
    for r in (info, models):
        assert str(demo_dir) not in r.text and "adapters/" not in r.text
        _assert_clean(r.text, r.url.path)
