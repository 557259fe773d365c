"""The adapter admin API (serve_app/admin.py) and the adapter metrics, without Ray (issue 5, bar 5).

The same Starlette app the Serve ingress runs, over an in-process ReplicaCore: the guard (disabled,
401 without/with a wrong token, 403 for sources outside the roots with nothing read), load ->
generate -> list -> reload -> unload (409 while a stream runs, 200 after), and the adapter series
on /metrics.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import engine.adapter_reader as adapter_reader
from engine import EngineConfig, SamplingParams
from models.demo import build_demo, demo_adapter_specs
from serve_app.admin import AdminConfig, check_source
from serve_app.backends import LocalBackend
from serve_app.core import ReplicaCore
from serve_app.http_app import create_app
from serve_app.settings import AppSettings, engine_config_from_dict, engine_config_to_dict
from tests.test_serve_http import wait_idle

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The quick brown fox"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("loraserve-cache"))


@pytest.fixture(scope="module")
def roots(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """allowed/fresh: a copy of demo adapter qv-r4; outside/: another adapter; allowed/escape -> outside."""
    base = tmp_path_factory.mktemp("adapter-roots")
    allowed, outside = base / "allowed", base / "outside"
    shutil.copytree(demo_dir / "adapters" / "qv-r4", allowed / "fresh")
    shutil.copytree(demo_dir / "adapters" / "mlp-r16", outside)
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    return {"allowed": allowed, "outside": outside, "fresh": allowed / "fresh", "escape": allowed / "escape"}


def _core(demo_dir: Path, roots: dict[str, Path], **overrides: Any) -> ReplicaCore:
    config = EngineConfig(model=str(demo_dir / "base"), adapters=demo_adapter_specs(demo_dir), num_kv_blocks=256,
                          max_model_len=512, adapter_source_roots=(str(roots["allowed"]),), **overrides)
    return ReplicaCore(config, "demo")


@pytest.fixture(scope="module")
def core(demo_dir: Path, roots: dict[str, Path]) -> Iterator[ReplicaCore]:
    c = _core(demo_dir, roots)
    yield c
    c.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Http:
    """httpx over the ASGI app, one event loop per call (the engine serves any caller's loop)."""

    def __init__(self, core: ReplicaCore, admin: AdminConfig | None) -> None:
        self.app = create_app(LocalBackend(core), admin=admin)

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.request(method, url, **kw)

    def __call__(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return run(self.request(method, url, **kw))


@pytest.fixture(scope="module")
def http(core: ReplicaCore, roots: dict[str, Path]) -> Http:
    return Http(core, AdminConfig(enabled=True, token=TOKEN, source_roots=(str(roots["allowed"]),)))


# ---- the guard -----------------------------------------------------------------------------------
def test_admin_routes_disabled_by_default(core: ReplicaCore) -> None:
    off = Http(core, None)
    for method, url in [("GET", "/adapters"), ("POST", "/adapters"), ("DELETE", "/adapters/qv-r4"),
                        ("POST", "/adapters/qv-r4/reload")]:
        r = off(method, url, headers=AUTH)
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden", (method, url, r.text)
        assert "admin API disabled" in r.json()["error"]
    assert "qv-r4" in [a["id"] for a in core.engine.adapter_info()]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": "Bearer "}, {"Authorization": f"Bearer {TOKEN}x"}])
def test_admin_routes_need_the_token(http: Http, core: ReplicaCore, headers: dict[str, str]) -> None:
    before = core.engine.pool.counters.source_loads
    for method, url, kw in [("GET", "/adapters", {}), ("DELETE", "/adapters/o-r2", {}),
                            ("POST", "/adapters/o-r2/reload", {}),
                            ("POST", "/adapters", {"json": {"id": "x", "source": "org/name"}})]:
        r = http(method, url, headers=headers, **kw)
        assert r.status_code == 401, (method, url, r.text)
        assert r.json()["error_type"] == "unauthorized" and r.json()["error"]  # the reason
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert "o-r2" in [a["id"] for a in core.engine.adapter_info()] and "x" not in [a["id"] for a in core.engine.adapter_info()]
    assert core.engine.pool.counters.source_loads == before  # the reload did not run


def test_enabled_without_a_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch, demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="no admin token"):
        AppSettings.from_args({"admin_enabled": True}, env={})
    with pytest.raises(ValueError, match="no admin token"):
        AdminConfig(enabled=True, token=None)
    s = AppSettings.from_args({"admin_enabled": True}, env={"LORASERVE_ADMIN_TOKEN": "from-env"})
    assert s.admin_config().token == "from-env"
    s = AppSettings.from_args({"admin_enabled": True, "admin_token": "from-config"}, env={"LORASERVE_ADMIN_TOKEN": "e"})
    assert s.admin_token == "from-config" and s.to_dict()["admin_token"] == "***" and "from-config" not in repr(s)
    # build_app (what `serve run` calls) fails the deploy, not a replica later.
    from serve_app.app import build_app

    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(demo_dir.parent))
    monkeypatch.delenv("LORASERVE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match="LORASERVE_ADMIN_TOKEN"):
        build_app({"model": "demo", "admin_enabled": True})
    monkeypatch.setenv("LORASERVE_ADMIN_TOKEN", "t")
    assert build_app({"model": "demo", "admin_enabled": True}) is not None


def test_dynamic_adapter_settings_reach_the_engine_config() -> None:
    s = AppSettings.from_args({"allow_dynamic_adapters": True, "adapter_source_roots": "/srv/a, /srv/b",
                               "host_cache_bytes": 1 << 20, "max_adapter_slots": 4, "preload_adapters": False},
                              env={})
    config = engine_config_from_dict(engine_config_to_dict(s.engine_config("m", ())))  # as a replica gets it
    assert config.allow_dynamic_adapters and config.adapter_source_roots == ("/srv/a", "/srv/b")
    assert config.host_cache_bytes == 1 << 20 and config.max_adapter_slots == 4 and not config.preload_adapters
    assert s.admin_config() == AdminConfig(False, None, ("/srv/a", "/srv/b"))
    assert AppSettings.from_args({"adapter_source_roots": ["/x"]}, env={}).engine["adapter_source_roots"] == ("/x",)


def test_check_source_rules(roots: dict[str, Path]) -> None:
    allowed = [str(roots["allowed"])]
    check_source("org/adapter-name", allowed)
    check_source(str(roots["fresh"]), allowed)
    for bad, reason in [(str(roots["outside"]), "outside"), (str(roots["escape"]), "outside"),
                        (str(roots["allowed"] / ".." / "outside"), "outside"), ("../outside", "neither"),
                        ("org/../name", "neither"), ("relative/dir/x", "neither"), ("/etc", "outside"), ("", "empty")]:
        with pytest.raises(PermissionError, match=reason):
            check_source(bad, allowed)
    with pytest.raises(PermissionError, match="none configured"):
        check_source(str(roots["fresh"]), [])


def test_sources_outside_the_roots_are_refused_and_nothing_is_read(
    http: Http, core: ReplicaCore, roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        raise AssertionError("an adapter was read")

    # Every way the pool reads an adapter goes through these two.
    monkeypatch.setattr(adapter_reader, "resolve_local_dir", spy)
    monkeypatch.setattr(adapter_reader, "load_peft_adapter", spy)
    ids_before = set([a["id"] for a in core.engine.adapter_info()])
    loads_before = core.engine.pool.counters.source_loads
    outside, escape = roots["outside"], roots["escape"]
    for source in [str(outside), str(roots["allowed"]) + "/../outside", str(escape), str(escape / "."), "../outside",
                   "outside", "/etc", "org/../../etc"]:
        r = http("POST", "/adapters", headers=AUTH, json={"id": "evil", "source": source})
        assert r.status_code == 403, (source, r.text)
        body = r.json()
        assert body["error_type"] == "forbidden" and "source refused" in body["error"] and source in body["error"]
    # The replica checks again with its own roots (defense in depth if the ingress's roots differ).
    result = run(core.admin("load", {"id": "evil", "source": str(escape)}))
    assert result["error"]["kind"] == "forbidden"
    assert reads == [] and set([a["id"] for a in core.engine.adapter_info()]) == ids_before
    assert core.engine.pool.counters.source_loads == loads_before


# ---- load, generate, list, reload, unload --------------------------------------------------------
def test_load_generate_list_reload(http: Http, core: ReplicaCore, roots: dict[str, Path]) -> None:
    r = http("POST", "/adapters", headers=AUTH, json={"id": "fresh", "source": str(roots["fresh"]), "preload": True})
    assert r.status_code == 200, r.text
    (replica,) = r.json()["replicas"]
    assert replica["result"]["id"] == "fresh" and replica["result"]["tier"] == "host" and replica["result"]["bytes"] > 0

    # The new adapter serves: the same weights as qv-r4, so the same greedy tokens.
    ref = run(core.engine.complete(PROMPT, SamplingParams(max_new_tokens=8), adapter_id="qv-r4"))
    g = http("POST", "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": "fresh"}})
    assert g.status_code == 200, g.text
    assert g.json()["generated_text"] == ref.generated_text

    listing = http("GET", "/adapters", headers=AUTH).json()
    assert listing["replicas"] == [core.replica_id] and listing["errors"] == []
    fresh = next(a for a in listing["adapters"] if a["id"] == "fresh")
    assert fresh["replica"] == core.replica_id and fresh["source"] == str(roots["fresh"])
    assert fresh["rank"] == 4 and set(fresh["targets"]) >= {"q_proj", "v_proj"} and fresh["bytes"] > 0
    assert fresh["tier"] == "device" and fresh["requests_served"] == 1 and fresh["last_used"]
    assert {a["tier"] for a in listing["adapters"]} <= {"disk", "host", "device"}

    r = http("POST", "/adapters/fresh/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert core.engine.pool.records["fresh"].source_reads == 2
    r = http("POST", "/adapters", headers=AUTH, json={"id": "fresh", "source": str(roots["fresh"])})  # id exists: reload
    assert r.status_code == 200 and core.engine.pool.records["fresh"].source_reads == 3
    g = http("POST", "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": "fresh"}})
    assert g.json()["generated_text"] == ref.generated_text
    wait_idle(core)


def test_admin_request_errors(http: Http, roots: dict[str, Path], tmp_path: Path) -> None:
    assert http("DELETE", "/adapters/nope", headers=AUTH).status_code == 404
    r = http("POST", "/adapters/nope/reload", headers=AUTH)
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    for body in [{}, {"source": str(roots["fresh"])}, {"id": "a b"}, {"id": "x", "preload": "yes"}, [1]]:
        assert http("POST", "/adapters", headers=AUTH, json=body).status_code == 422, body
    assert http("POST", "/adapters", headers=AUTH, content=b"{nope").status_code == 422
    # A directory under the roots that is not an adapter: the load fails with its reason (424).
    empty = roots["allowed"] / "empty"
    empty.mkdir(exist_ok=True)
    r = http("POST", "/adapters", headers=AUTH, json={"id": "empty", "source": str(empty)})
    assert r.status_code == 424 and r.json()["error_type"] == "adapter_load", r.text
    assert "empty" not in [a["id"] for a in http("GET", "/adapters", headers=AUTH).json()["adapters"]]


def test_unload_refused_while_a_stream_runs_then_gone(http: Http, core: ReplicaCore, roots: dict[str, Path]) -> None:
    shutil.copytree(roots["fresh"], roots["allowed"] / "busy", dirs_exist_ok=True)
    r = http("POST", "/adapters", headers=AUTH, json={"id": "busy", "source": str(roots["allowed"] / "busy")})
    assert r.status_code == 200, r.text

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        chunks: AsyncIterator[list[dict[str, Any]]] = core.stream(
            {"prompt": PROMPT, "adapter_id": "busy", "params": {"max_new_tokens": 400, "ignore_eos": True}})
        await chunks.__anext__()  # the stream is running: the adapter's slot is pinned
        refused = await http.request("DELETE", "/adapters/busy", headers=AUTH)
        reload_refused = await http.request("POST", "/adapters/busy/reload", headers=AUTH)
        await chunks.aclose()  # the client goes away
        return refused, reload_refused

    refused, reload_refused = run(scenario())
    assert refused.status_code == 409, refused.text
    assert refused.json()["error_type"] == "adapter_busy" and "refused: in use" in refused.json()["error"]
    assert reload_refused.status_code == 409
    wait_idle(core)
    r = http("DELETE", "/adapters/busy", headers=AUTH)
    assert r.status_code == 200, r.text
    assert "busy" not in [a["id"] for a in http("GET", "/adapters", headers=AUTH).json()["adapters"]]
    assert "busy" not in [a["id"] for a in http("GET", "/info").json()["adapters"]]
    g = http("POST", "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "busy"}})
    assert g.status_code == 422 and "unknown adapter" in g.json()["error"]
    assert http("DELETE", "/adapters/busy", headers=AUTH).status_code == 404


# ---- metrics -------------------------------------------------------------------------------------
def test_adapter_metrics(demo_dir: Path, roots: dict[str, Path], core: ReplicaCore) -> None:
    sizes = {a["id"]: int(a["bytes"]) for a in core.engine.adapter_info()}
    # One device slot and a host budget for one of the two adapters: each switch evicts in both tiers.
    small = _core(demo_dir, roots, max_adapter_slots=1, preload_adapters=False,
                  host_cache_bytes=max(sizes["qv-r4"], sizes["o-r2"]))
    try:
        http = Http(small, AdminConfig(enabled=True, token=TOKEN, source_roots=(str(roots["allowed"]),)))
        for adapter in ["qv-r4", "qv-r4", "o-r2"]:
            r = http("POST", "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2,
                                                                                "adapter_id": adapter}})
            assert r.status_code == 200, r.text
        text = http("GET", "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def value(name: str, sample: str, **labels: str) -> float:
            return next(s.value for s in families[name].samples
                        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

        c = "loraserve_adapter_"
        assert value(c + "cache_hits", c + "cache_hits_total", tier="device") >= 1  # the second qv-r4
        assert value(c + "cache_misses", c + "cache_misses_total", tier="host") == 2  # two cold reads
        assert value(c + "loads", c + "loads_total", tier="host") == 2
        assert value(c + "loads", c + "loads_total", tier="device") == 2
        assert value(c + "evictions", c + "evictions_total", tier="device") == 1
        assert value(c + "evictions", c + "evictions_total", tier="host") == 1
        assert value(c + "load_seconds", c + "load_seconds_count") == 2
        assert value(c + "load_seconds", c + "load_seconds_bucket", le="+Inf") == 2
        assert value(c + "bytes", c + "bytes", tier="host") == small.engine.pool.host_bytes > 0
        assert value(c + "bytes", c + "bytes", tier="device") > 0
        assert value(c + "capacity_bytes", c + "capacity_bytes", tier="device") > 0
        assert value(c + "load_failures", c + "load_failures_total") == 0
        assert value("loraserve_adapters", "loraserve_adapters", state="device") == 1
        # Counters stay monotonic across scrapes (the histogram is fed incrementally, not rebuilt).
        again = {f.name: f for f in text_string_to_metric_families(http("GET", "/metrics").text)}
        assert next(s.value for s in again[c + "load_seconds"].samples if s.name.endswith("_count")) == 2
        # Admin route calls are counted under one bounded label.
        http("DELETE", "/adapters/none", headers=AUTH)
        routes = {s.labels["route"] for s in
                  next(f for f in text_string_to_metric_families(http("GET", "/metrics").text)
                       if f.name == "loraserve_http_requests").samples}
        assert "/adapters/{id}" in routes
    finally:
        small.shutdown()
