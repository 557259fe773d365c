"""End to end on Ray Serve with the demo model: aggregate-load autoscaling, adapter-affinity routing,
and a short load-test smoke run, sharing one Ray instance (starting Ray costs most of the time).

Serve runs in this process (`ray.init` + `serve.run(build_app(args))`) rather than as `serve run`
in a subprocess, so that the tests can read the controller's replica states (`serve.status()`) and
redeploy with other args without restarting Ray. Ray gets its own short temp dir; teardown shuts
Serve and Ray down and fails if any process of that Ray instance survives.

1. test_burst_scales_up_then_down: min 1 / max 2 replicas (0.5 CPU each); a burst of concurrent
   requests makes the policy ask for 2, and after the burst the deployment returns to 1. Every
   request succeeds or gets 429.
2. test_loadtest_smoke: `python -m loadtests.run_loadtest --scenario burst` for ~30 s against this
   server writes its report, and the numbers inside are checked.
3. test_affinity_routing_keeps_adapters_on_their_replica: 2 fixed replicas, adapters spread over
   them by their first requests; >= 90% of later requests for an adapter resident on exactly one
   replica land there (counted by the replicas' own per-adapter request counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.demo import DEMO_ADAPTERS, build_demo
from tests.ray_serve_helpers import REPO, local_serve, python_path_with_repo, replica_states

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]

APP = "loraserve"
ADAPTERS = [a[0] for a in DEMO_ADAPTERS]
PROMPT = "The quick brown fox"

# Small engine + quick autoscaling so a burst on 2 shared CPU cores crosses the target within seconds.
ADMIN_TOKEN = "autoscaling-e2e-admin-token"  # GET /admin/stats is behind the admin API's guard
BASE_ARGS: dict[str, Any] = {
    "model": "demo",
    "admin_enabled": True,
    "admin_token": ADMIN_TOKEN,
    "dtype": "float32",
    "device": "cpu",
    "num_kv_blocks": 256,
    "max_model_len": 256,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 256,
    "max_waiting": 64,
    "replica_num_cpus": 0.5,
    "stream_messages_per_s": 20,
    "routing_stats_period_s": 0.5,
}
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
    "target_load_per_replica": 4,
}


class ServeInstance:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, **args: Any) -> None:
        from ray import serve

        from serve_app.app import build_app

        serve.run(build_app({**BASE_ARGS, **args}), name=APP, route_prefix="/")
        deadline = time.monotonic() + 180
        while True:  # serve.run returns once the app is RUNNING; the HTTP proxy may lag slightly
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, "no healthy /health after deploy"
            time.sleep(0.5)

    @staticmethod
    def replica_states() -> dict[str, int]:
        return replica_states(APP)

    def running_replicas(self) -> int:
        return self.replica_states().get("RUNNING", 0)


@pytest.fixture(scope="module")
def serve_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    cache = tmp_path_factory.mktemp("autoscale-e2e") / "cache"
    build_demo(cache)
    with local_serve(cache, "lsas") as port:
        instance = ServeInstance(port)
        instance.deploy(autoscaling_config=AUTOSCALING)
        yield instance


def _wait_replicas(instance: ServeInstance, want: int, timeout: float) -> list[tuple[float, dict[str, int]]]:
    """Wait for exactly `want` RUNNING replicas and nothing starting/stopping; the states seen on the way."""
    seen: list[tuple[float, dict[str, int]]] = []
    start = time.monotonic()
    while True:
        states = instance.replica_states()
        seen.append((time.monotonic() - start, states))
        if states.get("RUNNING", 0) == want and sum(states.values()) == want:
            return seen
        if time.monotonic() - start > timeout:
            pytest.fail(f"not {want} replicas after {timeout}s; states seen: {seen[-10:]}")
        time.sleep(0.5)


async def _burst(url: str, users: int, stop: asyncio.Event, statuses: dict[int, int], errors: list[str]) -> None:
    """`users` closed-loop clients sending /generate (half streaming) until `stop` is set."""
    async def user(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not stop.is_set():
                body = {"inputs": PROMPT, "parameters": {"adapter_id": rng.choice(ADAPTERS), "max_new_tokens": 24}}
                try:
                    if i % 2:
                        async with client.stream("POST", "/generate_stream", json=body) as r:
                            text = (await r.aread()).decode(errors="replace")
                            status = r.status_code
                            if status == 200 and '"error"' in text:
                                errors.append(text[-300:])
                    else:
                        r = await client.post("/generate", json=body)
                        status = r.status_code
                        if status not in (200, 429):
                            errors.append(r.text[:300])
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(user(i) for i in range(users)))


def test_burst_scales_up_then_down(serve_instance: ServeInstance) -> None:
    assert serve_instance.running_replicas() == 1  # min_replicas at rest
    statuses: dict[int, int] = {}
    errors: list[str] = []
    replica_trace: list[tuple[float, int]] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        burst = asyncio.create_task(_burst(serve_instance.url, 16, stop, statuses, errors))
        start = time.monotonic()
        try:
            while time.monotonic() - start < 120:
                running = await asyncio.to_thread(serve_instance.running_replicas)
                replica_trace.append((round(time.monotonic() - start, 1), running))
                if running == 2:
                    await asyncio.sleep(3)  # let the new replica take some of the burst
                    break
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await burst

    asyncio.run(scenario())
    assert max(n for _, n in replica_trace) == 2, f"no scale-up during the burst: {replica_trace}"
    assert statuses.get(200, 0) > 0
    assert set(statuses) <= {200, 429}, statuses
    assert not errors, errors[:5]
    # Idle now: the aggregate load is 0, so after downscale_delay_s the policy returns to min 1.
    _wait_replicas(serve_instance, 1, timeout=90)
    r = httpx.post(f"{serve_instance.url}/generate", timeout=60,
                   json={"inputs": PROMPT, "parameters": {"adapter_id": ADAPTERS[0], "max_new_tokens": 4}})
    assert r.status_code == 200


def test_loadtest_smoke(serve_instance: ServeInstance, tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "loadtests.run_loadtest", "--scenario", "burst", "--host", serve_instance.url,
           "--duration", "30", "--users", "12", "--max-requests", "3000", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": python_path_with_repo(os.environ.get("PYTHONPATH")),
           "LORASERVE_ADMIN_TOKEN": ADMIN_TOKEN}  # the runner samples GET /admin/stats with it
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.html", "summary.md", "summary.json", "requests_per_s.png", "latency.png", "ttft.png",
                 "errors.png", "replicas.png", "adapter_latency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    phases = {p["phase"]: p for p in summary["phases"]}
    assert set(phases) == {"before", "during", "after"}
    total = summary["total"]
    assert total["requests"] > 20 and total["ok"] > 0
    assert total["throughput_rps"] > 0
    assert set(total["errors"]) <= {"429"}, total["errors"]  # nothing but back-pressure may fail
    during = phases["during"]
    assert during["requests"] > phases["before"]["requests"]  # the burst phase carries more traffic
    assert during["ttft_p50_s"] is not None and 0 < during["ttft_p50_s"] <= during["ttft_p95_s"]
    assert 1 <= summary["replicas"]["max"] <= 2 and summary["replicas"]["samples"] > 5
    # The same numbers reach the human-readable files.
    md = (out / "summary.md").read_text()
    assert "| during |" in md and f"{during['requests']}" in md
    assert "summary" in (out / "report.html").read_text().lower()


def _replica_counts(url: str) -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    """From every replica's snapshot: its device-resident adapters, and requests per (replica, adapter)
    counted by the replica itself (any final status)."""
    replicas = httpx.get(f"{url}/admin/stats", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["replicas"]
    device: dict[str, set[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for snap in replicas:
        device[snap["replica"]] = set(snap.get("device_adapters", []))
        for adapter, _status, n in snap["metrics"]["requests"]:
            key = (snap["replica"], adapter)
            counts[key] = counts.get(key, 0) + int(n)
    return device, counts


def _wait_router_reaches(url: str, want: int, timeout: float) -> None:
    """Base-model requests (they load no adapter) until `want` replicas have answered one.

    The controller reports a replica RUNNING before the ingress's router has it in its replica set
    (that update arrives by long poll), and until then every request goes to the replica it knows."""
    deadline = time.monotonic() + timeout

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/generate", json={
                "inputs": PROMPT, "parameters": {"max_new_tokens": 1}}) for _ in range(6)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]

    while True:
        asyncio.run(burst())
        _, counts = _replica_counts(url)
        served = {rid for (rid, _adapter), n in counts.items() if n > 0}
        if len(served) >= want:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"requests reached only {sorted(served)} after {timeout}s")
        time.sleep(0.5)


def test_affinity_routing_keeps_adapters_on_their_replica(serve_instance: ServeInstance) -> None:
    # A changed engine arg (seed) makes both replicas new: no adapter is resident anywhere yet.
    serve_instance.deploy(model_replicas=2, affinity_routing=True, affinity_imbalance_threshold=8, seed=7)
    _wait_replicas(serve_instance, 2, timeout=120)
    url = serve_instance.url
    _wait_router_reaches(url, 2, timeout=60)

    async def first_requests() -> None:
        # One request per adapter, all at once: with no holder anywhere the router takes the less
        # loaded replica, and its queue-length cache counts each request it sends, so the adapters
        # alternate between the two replicas and each loads its share.
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/generate", json={
                "inputs": PROMPT, "parameters": {"adapter_id": a, "max_new_tokens": 16}}) for a in ADAPTERS))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]

    asyncio.run(first_requests())
    device, before = _replica_counts(url)
    assert len(device) == 2
    residency = {a: [rid for rid, held in device.items() if a in held] for a in ADAPTERS}
    single = {a: rids[0] for a, rids in residency.items() if len(rids) == 1}
    assert len(single) >= len(ADAPTERS) // 2, residency
    assert len(set(single.values())) == 2, f"adapters not split over the two replicas: {residency}"

    async def traffic() -> None:
        sem = asyncio.Semaphore(4)  # moderate concurrency: well inside the imbalance threshold

        async def one(client: httpx.AsyncClient, adapter: str) -> None:
            async with sem:
                r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": adapter,
                                                                                          "max_new_tokens": 4}})
                assert r.status_code == 200, r.text

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(one(client, ADAPTERS[i % len(ADAPTERS)]) for i in range(96)))

    asyncio.run(traffic())
    _, after = _replica_counts(url)
    on_holder = elsewhere = 0
    for adapter, holder in single.items():
        for rid in device:
            delta = after.get((rid, adapter), 0) - before.get((rid, adapter), 0)
            if rid == holder:
                on_holder += delta
            else:
                elsewhere += delta
    assert on_holder + elsewhere >= 40, (on_holder, elsewhere)
    share = on_holder / (on_holder + elsewhere)
    print(f"affinity: {on_holder}/{on_holder + elsewhere} = {share:.1%} on the holder; residency {residency}")
    assert share >= 0.9, (share, residency)
