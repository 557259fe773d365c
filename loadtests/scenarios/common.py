"""What every locustfile shares: a user that calls the TGI routes, and a per-request event log.

The user sends `POST /generate` (TGI, `parameters.adapter_id`) or `POST /generate_stream` (SSE;
time to first token is measured from the first token event of the stream). Each request is
reported to locust (so its own --csv stats work) and written as one JSON line to the file named by
`LOADTEST_EVENTS`; loadtests/run_loadtest.py builds its plots and tables from those lines, which
keep what locust's aggregates lose (per-request time, adapter, TTFT, error type).

Environment (set by the runner, all optional):
    LOADTEST_EVENTS          JSONL path for per-request events (default: no log)
    LOADTEST_MAX_REQUESTS    stop the test after this many requests (default: unbounded)
    LOADTEST_STREAM_FRACTION share of requests sent to /generate_stream (default 0.5)
    LOADTEST_ADAPTERS        comma-separated adapter ids (default: the server's, from GET /info)
    LOADTEST_WAIT_S          think time between a user's requests (default 0.05)
    LOADTEST_T0              the test's start (unix time) shared by several locust processes
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from typing import Any, TextIO

from locust import HttpUser, events
from locust.env import Environment

# The demo model's adapters: the fallback when /info cannot be read.
DEMO_ADAPTER_IDS = ("qv-r4", "attn-r8", "mlp-r16", "qv-down-r8", "all-r32", "o-r2", "qv-rslora-r8", "kv-up-r16-l01")

_log: TextIO | None = None
_count = 0
_adapters: list[str] = []


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def test_start_time() -> float:
    """When the test started: LOADTEST_T0 (a unix time) when the runner starts several locust
    processes for one test (their phases must count from the same moment), else now."""
    return env_float("LOADTEST_T0", 0.0) or time.time()


def write_event(record: dict[str, Any]) -> None:
    if _log is not None:
        _log.write(json.dumps(record) + "\n")
        _log.flush()  # the runner tails this file for its progress line


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    global _log
    path = os.environ.get("LOADTEST_EVENTS")
    if path:
        _log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at test_stop
    write_event({"event": "start", "t": test_start_time()})


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    global _log
    write_event({"event": "stop", "t": time.time()})
    if _log is not None:
        _log.close()
        _log = None


def server_adapters(user: HttpUser) -> list[str]:
    """Adapter ids to draw from: LOADTEST_ADAPTERS, else the server's (GET /info), else the demo's."""
    global _adapters
    if _adapters:
        return _adapters
    configured = [a for a in os.environ.get("LOADTEST_ADAPTERS", "").split(",") if a]
    if configured:
        _adapters = configured
        return _adapters
    try:
        info = user.client.get("/info", name="/info", timeout=30).json()
        ids = [str(a["id"]) for a in info.get("adapters", []) if isinstance(a, dict) and a.get("id")]
    except Exception:  # an older server without the adapters list, or not up yet
        ids = []
    _adapters = ids or list(DEMO_ADAPTER_IDS)
    return _adapters


def _count_request(user: HttpUser) -> None:
    """Bound the run by request count: the runner's --max-requests."""
    global _count
    _count += 1
    limit = int(env_float("LOADTEST_MAX_REQUESTS", 0))
    if limit and _count >= limit and user.environment.runner is not None:
        user.environment.runner.quit()


def error_type(status: int, exc: BaseException | None) -> str | None:
    if exc is not None:
        return type(exc).__name__
    return None if status == 200 else str(status)


class LoraUser(HttpUser):
    """Closed-loop client of the TGI routes. Subclasses choose adapter, prompt and output length."""

    abstract = True

    def wait_time(self) -> float:
        return env_float("LOADTEST_WAIT_S", 0.05)

    # ---- what to send (overridden per scenario) -----------------------------------------------
    def pick_adapter(self) -> str:
        return random.choice(server_adapters(self))

    def pick_prompt(self) -> str:
        return "Tell me about the weather in"

    def pick_max_new_tokens(self) -> int:
        return 24

    def stream_fraction(self) -> float:
        return env_float("LOADTEST_STREAM_FRACTION", 0.5)

    # ---- sending ------------------------------------------------------------------------------
    def one_request(self) -> None:
        adapter = self.pick_adapter()
        body = {"inputs": self.pick_prompt(),
                "parameters": {"adapter_id": adapter, "max_new_tokens": self.pick_max_new_tokens()}}
        if random.random() < self.stream_fraction():
            self._stream(body, adapter)
        else:
            self._generate(body, adapter)
        _count_request(self)

    def _record(self, kind: str, adapter: str, start: float, status: int, exc: BaseException | None,
                ttft: float | None, tokens: int) -> None:
        latency = time.time() - start
        write_event({"event": "request", "t": start, "kind": kind, "adapter": adapter, "status": status,
                     "error": error_type(status, exc), "latency_s": latency, "ttft_s": ttft, "tokens": tokens})

    def _generate(self, body: dict[str, Any], adapter: str) -> None:
        start = time.time()
        status, exc, tokens = 0, None, 0
        with self.client.post("/generate", json=body, name="/generate", catch_response=True, timeout=300) as r:
            status = r.status_code
            if status == 200:
                details = (r.json() or {}).get("details") or {}
                tokens = int(details.get("generated_tokens", 0))
                r.success()
            else:
                r.failure(f"HTTP {status}")
                # status 0: no HTTP response at all (connection refused/reset); keep its exception
                exc = r.error if status == 0 and isinstance(r.error, BaseException) else None
        self._record("generate", adapter, start, status, exc, None, tokens)

    def _stream(self, body: dict[str, Any], adapter: str) -> None:
        start = time.time()
        ttft: float | None = None
        tokens, status, exc = 0, 0, None
        fire: Callable[..., Any] = self.environment.events.request.fire
        try:
            with self.client.post("/generate_stream", json=body, name="/generate_stream", stream=True,
                                  catch_response=True, timeout=300) as r:
                status = r.status_code
                if status != 200:
                    r.failure(f"HTTP {status}")
                else:
                    failed = None
                    for line in r.iter_lines():
                        if not line or not line.startswith(b"data:"):
                            continue
                        event = json.loads(line[5:])
                        if "error" in event:
                            failed = str(event.get("error_type") or "stream_error")
                            break
                        if event.get("token") is not None:
                            tokens += 1
                            if ttft is None:
                                ttft = time.time() - start
                    if failed:
                        status = 599  # an error event inside a 200 stream
                        exc = RuntimeError(failed)
                        r.failure(failed)
                    else:
                        r.success()
        except Exception as e:  # connection reset mid-stream etc.
            exc = e
        if ttft is not None:
            # TTFT as its own locust entry, so locust's CSV shows its percentiles too.
            fire(request_type="TTFT", name="/generate_stream ttft", response_time=ttft * 1000,
                 response_length=0, exception=None, context={})
        self._record("generate_stream", adapter, start, status, exc, ttft, tokens)
