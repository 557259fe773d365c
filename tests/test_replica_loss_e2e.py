"""End to end on Ray Serve with the demo model: a model replica process killed (SIGKILL) mid-traffic.

Serve runs in this process (`ray.init` + `serve.run(build_app(args))`, as in
tests/test_autoscaling_e2e.py) so that the test can read the controller's replica states and find
the replica processes: they are this process's descendants titled `ray::ServeReplica:<app>:ModelReplica`
(read from /proc; no route exposes a pid). Ray gets its own short temp dir; teardown shuts Serve and
Ray down and fails if any process of that Ray instance survives.

1. test_single_replica_killed: 20 long requests in flight (half streamed), the only replica
   killed. Each non-streamed one gets 503 with Retry-After and a plain message, each stream a 200
   that ends with an error event, within seconds; a request sent during the restart gets 200 or
   503 within `request_timeout_s`; after the restart the service answers 200 again.
2. test_one_of_two_replicas_killed: closed-loop traffic over 2 replicas, one killed. Requests in
   flight end within seconds (200, 503 or a stream's error event), later ones are all served by
   the other replica (200), nothing hangs, and the deployment is back to 2 replicas.
3. test_engine_process_killed: with `engine_process: true`, the engine's own process killed under
   load (requests in flight end within seconds, the replica is replaced), then a replica killed
   outright (its engine process exits with it).

No error body may show internals (traceback, actor, pid, paths, addresses). Every client call has a
timeout well below the test's, so a hanging request fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from models.demo import DEMO_ADAPTERS, build_demo
from serve_app.handle_errors import REPLICA_LOST_MESSAGE
from tests.ray_serve_helpers import descendants, local_serve, proc_table, replica_states

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]

APP = "replica-loss"
ADAPTERS = [a[0] for a in DEMO_ADAPTERS]
REQUEST_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 45.0  # > request_timeout_s; far below the test timeout
# In-flight requests on a killed replica must be answered within this long after the kill.
ENDS_WITHIN_S = 8.0

ARGS: dict[str, Any] = {
    "model": "demo",
    "dtype": "float32",
    "device": "cpu",
    "num_kv_blocks": 1024,
    "max_model_len": 1024,
    "max_num_seqs": 32,
    "max_num_batched_tokens": 512,
    "max_waiting": 64,
    "replica_num_cpus": 0.5,
    "stream_messages_per_s": 20,
    "routing_stats_period_s": 0.5,
    "request_timeout_s": REQUEST_TIMEOUT_S,
}

# What no error answer may contain: tracebacks, Ray's actor ids / pids / addresses, file paths.
LEAKS = re.compile(r"traceback|actor|\bpid\b|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|/(?:tmp|root|home|work|usr|srv)/",
                   re.IGNORECASE)


def model_replica_pids() -> list[int]:
    """Live ModelReplica processes of this test's Ray instance (its processes descend from this one)."""
    table = proc_table()
    mine = descendants(os.getpid()) & table.keys()
    title = f"ray::ServeReplica:{APP}:ModelReplica"
    return sorted(p for p in mine if table[p][2].startswith(title) and table[p][1] not in ("Z", "X"))


class ServeInstance:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, **args: Any) -> None:
        from ray import serve

        from serve_app.app import build_app

        serve.run(build_app({**ARGS, **args}), name=APP, route_prefix="/")
        self.wait_serving(180)

    def wait_serving(self, timeout_s: float) -> float:
        """Until a short /generate answers 200; returns how long that took."""
        start = time.monotonic()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(f"{self.url}/generate", json=body(4), timeout=REQUEST_TIMEOUT_S + 5)
                if r.status_code == 200:
                    return time.monotonic() - start
            assert time.monotonic() - start < timeout_s, f"no 200 from /generate after {timeout_s}s"
            time.sleep(0.5)

    @staticmethod
    def replica_states() -> dict[str, int]:
        return replica_states(APP)

    def wait_replicas(self, want: int, timeout_s: float) -> float:
        """Until exactly `want` replicas RUNNING (nothing starting or stopping) and as many processes."""
        start = time.monotonic()
        while True:
            states = self.replica_states()
            if states.get("RUNNING", 0) == want and sum(states.values()) == want and len(model_replica_pids()) == want:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout_s, f"not {want} replicas after {timeout_s}s: {states}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def serve_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    cache = tmp_path_factory.mktemp("replica-loss") / "cache"
    build_demo(cache)
    with local_serve(cache, "lsrl") as port:
        yield ServeInstance(port)


def body(max_new_tokens: int, i: int = 0) -> dict[str, Any]:
    return {"inputs": f"The quick brown fox {i}",
            "parameters": {"adapter_id": ADAPTERS[i % len(ADAPTERS)], "max_new_tokens": max_new_tokens}}


@dataclass
class Outcome:
    """One client request as the client saw it (times: time.monotonic())."""

    streamed: bool
    started: float
    ended: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""
    events: list[Any] = field(default_factory=list)
    client_error: str | None = None

    @property
    def stream_error(self) -> Any:
        return self.events[-1] if self.events and "error" in self.events[-1] else None


async def send(client: httpx.AsyncClient, streamed: bool, payload: dict[str, Any],
               out: Outcome | None = None) -> Outcome:
    """Sends one request and records what came back in `out` (events as they arrive)."""
    out = out or Outcome(streamed, time.monotonic())
    out.started = time.monotonic()
    try:
        if streamed:
            async with client.stream("POST", "/generate_stream", json=payload) as r:
                out.status, out.headers = r.status_code, dict(r.headers)
                async for line in r.aiter_lines():
                    out.text += line + "\n"
                    if line.startswith("data:"):
                        out.events.append(json.loads(line[5:]))
        else:
            r = await client.post("/generate", json=payload)
            out.status, out.headers, out.text = r.status_code, dict(r.headers), r.text
    except httpx.HTTPError as exc:  # a timeout here means a request hung
        out.client_error = repr(exc)
    out.ended = time.monotonic()
    return out


def assert_plain_503(out: Outcome) -> None:
    assert out.status == 503, (out.status, out.text[:300])
    assert int(out.headers["retry-after"]) > 0
    assert out.headers["content-type"].startswith("application/json")
    assert json.loads(out.text)["error_type"] == "unhealthy"
    assert not LEAKS.search(out.text), out.text


def assert_stream_error_event(out: Outcome) -> None:
    assert out.status == 200 and out.stream_error is not None, (out.status, out.text[-300:])
    error = out.stream_error
    assert error["error_type"] == "unhealthy"
    assert not LEAKS.search(json.dumps(error)), error


def completed(out: Outcome) -> bool:
    """A whole answer: a 200 JSON body with the generated text, or a stream whose last event is the
    final one (it carries `generated_text`) and not an error."""
    if out.status != 200:
        return False
    if out.streamed:
        return bool(out.events) and out.stream_error is None and out.events[-1].get("generated_text") is not None
    return "generated_text" in json.loads(out.text)


async def long_requests_decoding(client: httpx.AsyncClient, n: int) -> list[asyncio.Future[Outcome]]:
    """`n` requests of 400 tokens (every other one streamed), in flight; returns once every stream has
    its first token: the whole batch is then decoding on the replica."""
    outcomes = [Outcome(i % 2 == 1, 0.0) for i in range(n)]
    tasks = [asyncio.ensure_future(send(client, o.streamed, body(400, i), o)) for i, o in enumerate(outcomes)]
    deadline = time.monotonic() + 60
    while not all(o.events or o.ended for o in outcomes if o.streamed):
        assert time.monotonic() < deadline, "streams got no first token within 60 s"
        await asyncio.sleep(0.2)
    return tasks


def kill(pid: int) -> float:
    assert pid in model_replica_pids()  # only a ModelReplica of this test's own Ray instance
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


# ---- 1. the only replica killed ------------------------------------------------------------------
def test_single_replica_killed(serve_instance: ServeInstance) -> None:
    serve_instance.deploy(model_replicas=1)
    serve_instance.wait_replicas(1, 60)
    [pid] = model_replica_pids()

    async def scenario() -> tuple[list[Outcome], float, Outcome]:
        async with httpx.AsyncClient(base_url=serve_instance.url, timeout=CLIENT_TIMEOUT_S) as client:
            # Long generations (400 tokens each, ~20 at once on half a core): all still running at the kill.
            tasks = await long_requests_decoding(client, 20)
            killed_at = kill(pid)
            await asyncio.sleep(0.5)
            during = await send(client, False, body(4))  # the replica is dead or restarting now
            return list(await asyncio.gather(*tasks)), killed_at, during

    outcomes, killed_at, during = asyncio.run(scenario())

    for out in outcomes:
        assert out.client_error is None, out.client_error
        if out.ended < killed_at or completed(out):
            # Finished (EOS) before the kill: a normal answer. One the replica finished just before
            # it died can still be on its way to the client at the kill, so a complete answer may
            # arrive a moment after it; nothing else may.
            assert out.status == 200, out.text[:300]
            assert out.ended - killed_at < ENDS_WITHIN_S
            continue
        assert out.ended - killed_at < ENDS_WITHIN_S, f"answered {out.ended - killed_at:.1f}s after the kill"
        if out.streamed:
            assert_stream_error_event(out)
            assert any("token" in e for e in out.events[:-1])  # tokens came before the error event
            assert out.stream_error["error"] == REPLICA_LOST_MESSAGE
        else:
            assert_plain_503(out)
            assert json.loads(out.text)["error"] == REPLICA_LOST_MESSAGE  # not a timeout: the loss itself
    assert sum(out.ended >= killed_at for out in outcomes) >= 15  # the kill did hit requests in flight

    # Sent while no replica was up: answered within request_timeout_s, 200 if the restart was quicker.
    assert during.client_error is None, during.client_error
    assert during.ended - during.started < REQUEST_TIMEOUT_S + 3
    if during.status != 200:
        assert_plain_503(during)

    # Serve restarts the replica and the service answers again.
    serve_instance.wait_serving(120)
    serve_instance.wait_replicas(1, 60)
    assert model_replica_pids() != [pid]


# ---- 2. one of two replicas killed ---------------------------------------------------------------
def test_one_of_two_replicas_killed(serve_instance: ServeInstance) -> None:
    # A longer timeout: here every request must succeed on the surviving replica, which now carries
    # all the traffic (retried requests included) on shared CPU cores.
    serve_instance.deploy(model_replicas=2, request_timeout_s=30.0)
    serve_instance.wait_replicas(2, 120)
    victim = model_replica_pids()[0]

    async def scenario() -> tuple[list[Outcome], float]:
        outcomes: list[Outcome] = []
        stop = asyncio.Event()

        async def user(i: int, client: httpx.AsyncClient) -> None:
            n = 0
            while not stop.is_set():
                outcomes.append(await send(client, i % 2 == 1, body(48, i * 100 + n)))
                n += 1

        async with httpx.AsyncClient(base_url=serve_instance.url, timeout=CLIENT_TIMEOUT_S) as client:
            users = [asyncio.ensure_future(user(i, client)) for i in range(8)]
            await asyncio.sleep(4)
            killed_at = kill(victim)
            await asyncio.sleep(10)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*users), CLIENT_TIMEOUT_S + 10)
        return outcomes, killed_at

    outcomes, killed_at = asyncio.run(scenario())
    back_after = serve_instance.wait_replicas(2, 60)

    assert all(o.client_error is None for o in outcomes), [o.client_error for o in outcomes if o.client_error]
    before = [o for o in outcomes if o.ended < killed_at]
    in_flight = [o for o in outcomes if o.started < killed_at <= o.ended]
    after = [o for o in outcomes if o.started >= killed_at + 2]  # the router has dropped the dead replica
    assert before and in_flight and len(after) >= 8, (len(before), len(in_flight), len(after))
    for out in before + after:
        assert out.status == 200 and out.stream_error is None, (out.status, out.text[-300:])
    for out in in_flight:
        assert out.ended - killed_at < ENDS_WITHIN_S, f"answered {out.ended - killed_at:.1f}s after the kill"
        if out.status == 200 and out.stream_error is None:
            continue  # finished on the other replica, or retried there (a non-streamed one)
        if out.streamed and out.status == 200:
            assert_stream_error_event(out)
        else:
            assert_plain_503(out)
    assert victim not in model_replica_pids()
    assert back_after < 60


# ---- 3. engine_process: the engine's own process killed, then its replica's ----------------------
def engine_worker_pids(replica_pid: int) -> list[int]:
    table = proc_table()
    return sorted(p for p in descendants(replica_pid) & table.keys()
                  if "engine.engine_worker" in table[p][2] and table[p][1] not in ("Z", "X"))


def test_engine_process_killed(serve_instance: ServeInstance) -> None:
    """With `engine_process: true` the engine runs in a child of the replica (engine/engine_process.py).
    Its death fails the requests in flight at once (503, a stream's error event), the replica's health
    check has it replaced, and a replica killed outright takes its engine process with it."""
    serve_instance.deploy(model_replicas=1, engine_process=True)
    serve_instance.wait_replicas(1, 60)
    [replica] = model_replica_pids()
    [worker] = engine_worker_pids(replica)

    async def scenario() -> tuple[list[Outcome], float]:
        async with httpx.AsyncClient(base_url=serve_instance.url, timeout=CLIENT_TIMEOUT_S) as client:
            tasks = await long_requests_decoding(client, 8)
            os.kill(worker, signal.SIGKILL)
            return list(await asyncio.gather(*tasks)), time.monotonic()

    outcomes, killed_at = asyncio.run(scenario())
    hit = [o for o in outcomes if not completed(o)]
    assert len(hit) >= 6, [(o.status, o.text[-200:]) for o in outcomes]
    for out in hit:
        assert out.client_error is None, out.client_error
        assert out.ended - killed_at < ENDS_WITHIN_S, f"answered {out.ended - killed_at:.1f}s after the kill"
        if out.streamed:
            assert_stream_error_event(out)
            assert any("token" in e for e in out.events[:-1])
        else:
            assert_plain_503(out)

    # The dead engine fails the replica's health check: Serve replaces the replica.
    serve_instance.wait_serving(120)
    serve_instance.wait_replicas(1, 60)
    [replica2] = model_replica_pids()
    assert replica2 != replica
    [worker2] = engine_worker_pids(replica2)

    # A replica killed outright: its engine process notices and exits.
    os.kill(replica2, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while worker2 in proc_table() and proc_table()[worker2][1] not in ("Z", "X"):
        assert time.monotonic() < deadline, "the engine process outlived its replica by 15 s"
        time.sleep(0.2)
    serve_instance.wait_serving(120)
