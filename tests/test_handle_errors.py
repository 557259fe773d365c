"""HandleBackend's failure handling without Ray running: a scripted fake DeploymentHandle.

What a lost or unreachable model replica does to a request (503 + Retry-After, plain message, the
replica call cancelled on timeout, one retry on another replica only when one is healthy), through
the real HTTP app. The same situations with real replicas killed: tests/test_replica_loss_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)
from starlette.testclient import TestClient

from engine.errors import EngineDeadError
from serve_app.deployments import HandleBackend
from serve_app.handle_errors import handle_failure
from serve_app.http_app import create_app
from serve_app.settings import AppSettings

PID_IP_TRACEBACK = "Traceback (most recent call last):\n  File \"/srv/loraserve/serve_app/core.py\", line 7"


def remote_error(cause: BaseException) -> RayTaskError:
    """What Ray raises in the caller when the replica's method raised `cause`."""
    return RayTaskError("ModelReplica.generate", PID_IP_TRACEBACK, cause, pid=4242, ip="10.1.2.3",
                        actor_id="0123456789abcdef").as_instanceof_cause()


LEAKS = re.compile(r"traceback|actor|pid|\d+\.\d+\.\d+\.\d+|/srv/|0123456789abcdef|4242", re.IGNORECASE)


# ---- the mapping ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "kind", "lost"), [
    (ActorDiedError(), "unavailable", True),
    (ActorUnavailableError("connection to pid 4242 at 10.1.2.3 lost", b"\x01" * 16), "unavailable", True),
    (WorkerCrashedError(), "unavailable", True),
    (remote_error(ActorDiedError()), "unavailable", True),
    (remote_error(EngineDeadError("engine step loop died")), "unavailable", False),
    (remote_error(ValueError("boom at /srv/loraserve")), "internal", False),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), "overloaded", False),
    (DeploymentUnavailableError(DeploymentID(name="ModelReplica", app_name="x")), "unavailable", False),
    (RequestCancelledError("req-1"), "unavailable", False),
    (GetTimeoutError("get timed out after 10 s on pid 4242"), "unavailable", False),
    (TimeoutError(), "unavailable", False),
    (KeyError("/srv/loraserve/secret"), "internal", False),
])
def test_every_handle_exception_maps_to_a_plain_error(exc: BaseException, kind: str, lost: bool) -> None:
    failure = handle_failure(exc)
    assert failure.info["kind"] == kind
    assert failure.replica_lost is lost
    assert not LEAKS.search(failure.info["message"]), failure.info["message"]
    assert str(exc) not in failure.info["message"] or not str(exc)


# ---- a scripted DeploymentHandle -------------------------------------------------------------------
class FakeResponse:
    """A DeploymentResponse: awaits `outcome` (a value, an exception, or None: never answers)."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self) -> Any:
        return self._result().__await__()

    async def _result(self) -> Any:
        if self.outcome is None:
            await asyncio.Event().wait()  # a request queued while no replica can take it
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeStream:
    """A DeploymentResponseGenerator: yields `chunks`, then raises `error` (or never ends if `hang`)."""

    def __init__(self, chunks: list[list[dict[str, Any]]], error: BaseException | None = None,
                 hang: bool = False) -> None:
        self.chunks, self.error, self.hang = list(chunks), error, hang
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> list[dict[str, Any]]:
        if self.chunks:
            return self.chunks.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeBroadcast:
    def __init__(self, results: list[Any]) -> None:
        self.results = results

    async def results_async(self, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        return self.results


class FakeMethod:
    def __init__(self, make: Callable[[], Any], calls: list[Any]) -> None:
        self.make, self.calls = make, calls

    def remote(self, *args: Any) -> Any:
        made = self.make()
        self.calls.append(made)
        return made


class FakeHandle:
    """Each call takes the next scripted response; `health` is what a broadcast probe gets back."""

    def __init__(self, responses: list[Any] = (), streams: list[FakeStream] = (),  # type: ignore[assignment]
                 health: list[Any] = (), info: Any = None) -> None:  # type: ignore[assignment]
        self.responses, self.streams, self.health_results = list(responses), list(streams), list(health)
        self.info_outcome = info or INFO
        self.calls: list[Any] = []  # generate and generate_stream calls
        self.control_calls: list[Any] = []  # info and health
        self.probes = 0

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeMethod:
        return FakeMethod(lambda: FakeResponse(self.responses.pop(0)), self.calls)

    @property
    def generate_stream(self) -> FakeMethod:
        return FakeMethod(lambda: self.streams.pop(0), self.calls)

    @property
    def info(self) -> FakeMethod:
        return FakeMethod(lambda: FakeResponse(self.info_outcome), self.control_calls)

    @property
    def health(self) -> FakeMethod:
        return FakeMethod(lambda: FakeResponse({"ok": True}), self.control_calls)

    def broadcast(self, method: str, *args: Any) -> FakeBroadcast:
        assert method == "health"
        self.probes += 1
        return FakeBroadcast(self.health_results)


INFO = {"model_id": "demo", "max_model_len": 1024, "max_input_chars": None, "adapters": []}
RESULT = {"finish_reason": "length", "generated_text": " jumps", "generated_tokens": 1, "prompt_tokens": 4,
          "seed": None, "token_ids": [7]}
DELTA = {"text": " jumps", "token": {"id": 7, "text": " jumps", "logprob": -0.5, "special": False},
         "top_tokens": None, "finished": False}
FINAL = {**DELTA, "text": "", "finished": True, **{k: RESULT[k] for k in
                                                     ("finish_reason", "generated_text", "generated_tokens",
                                                      "prompt_tokens", "seed")}}
BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}


def client(handle: FakeHandle, timeout_s: float = 30.0) -> TestClient:
    return TestClient(create_app(HandleBackend(handle, request_timeout_s=timeout_s)))  # type: ignore[arg-type]


def assert_unavailable(r: Any) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) > 0
    assert not LEAKS.search(r.text), r.text


def sse(text: str) -> list[Any]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


# ---- non-streamed --------------------------------------------------------------------------------
def test_replica_died_with_no_healthy_replica_left_is_503_at_once() -> None:
    handle = FakeHandle(responses=[ActorDiedError(), ActorDiedError()], health=[ActorDiedError()])
    with client(handle) as http:
        r = http.post("/generate", json=BODY)
        assert_unavailable(r)
        assert r.json()["error_type"] == "unhealthy"
        oa = http.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2})
    assert len(handle.calls) == 1 + 1  # one TGI attempt (no retry: nothing healthy), one OpenAI
    assert_unavailable(oa)
    assert oa.json()["error"]["type"] == "server_error"


def test_replica_died_is_retried_once_on_a_healthy_replica() -> None:
    handle = FakeHandle(responses=[ActorDiedError(), RESULT], health=[ActorDiedError(), {"ok": True}])
    with client(handle) as http:
        r = http.post("/generate", json=BODY)
    assert r.status_code == 200 and r.json()["generated_text"] == " jumps"
    assert len(handle.calls) == 2 and handle.probes == 1


def test_only_one_retry() -> None:
    handle = FakeHandle(responses=[ActorDiedError(), ActorDiedError(), RESULT], health=[{"ok": True}])
    with client(handle) as http:
        assert_unavailable(http.post("/generate", json=BODY))
    assert len(handle.calls) == 2


@pytest.mark.parametrize("error", [remote_error(ValueError("boom at /srv/x.py")),
                                   BackPressureError(num_queued_requests=9, max_queued_requests=8)])
def test_other_failures_are_not_retried(error: BaseException) -> None:
    handle = FakeHandle(responses=[error, RESULT], health=[{"ok": True}])
    with client(handle) as http:
        r = http.post("/generate", json=BODY)
    assert r.status_code in (500, 429) and not LEAKS.search(r.text), r.text
    assert "retry-after" not in r.headers
    assert len(handle.calls) == 1 and handle.probes == 0


def test_no_replica_within_the_timeout_is_503_and_cancels_the_call() -> None:
    handle = FakeHandle(responses=[None])
    with client(handle, timeout_s=0.2) as http:
        r = http.post("/generate", json=BODY)
    assert_unavailable(r)
    assert "0.2 s" in r.json()["error"]
    assert handle.calls[0].cancelled  # the queued request is withdrawn from Serve's queue


def test_info_failure_is_plain() -> None:
    handle = FakeHandle(info=ActorDiedError())
    with client(handle) as http:
        r = http.get("/info")
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert_unavailable(r)
    assert_unavailable(chat)


# ---- streamed ------------------------------------------------------------------------------------
def test_stream_losing_its_replica_mid_way_ends_with_an_error_event() -> None:
    stream = FakeStream([[DELTA]], error=ActorDiedError())
    handle = FakeHandle(streams=[stream], health=[{"ok": True}])
    with client(handle) as http:
        r = http.post("/generate_stream", json=BODY)
    assert r.status_code == 200
    events = sse(r.text)
    assert events[0]["token"]["id"] == 7
    assert events[-1]["error_type"] == "unhealthy" and not LEAKS.search(json.dumps(events[-1]))
    assert len(handle.calls) == 1  # tokens were sent: never retried
    assert stream.cancelled


def test_stream_failing_before_its_first_chunk_is_retried_on_a_healthy_replica() -> None:
    handle = FakeHandle(streams=[FakeStream([], error=ActorDiedError()), FakeStream([[DELTA], [FINAL]])],
                        health=[{"ok": True}])
    with client(handle) as http:
        r = http.post("/generate_stream", json=BODY)
    assert r.status_code == 200
    assert [e["token"]["id"] for e in sse(r.text)] == [7, 7]
    assert sse(r.text)[-1]["generated_text"] == " jumps"


def test_stream_failing_before_its_first_chunk_without_healthy_replica_is_503() -> None:
    handle = FakeHandle(streams=[FakeStream([], error=ActorDiedError()), FakeStream([], error=ActorDiedError())],
                        health=[])
    with client(handle) as http:
        assert_unavailable(http.post("/generate_stream", json=BODY))
        oa = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True, "model": "demo"})
    assert_unavailable(oa)
    assert oa.json()["error"]["type"] == "server_error"
    assert len(handle.calls) == 2  # one attempt each


def test_stream_without_first_chunk_in_time_is_503() -> None:
    stream = FakeStream([], hang=True)
    handle = FakeHandle(streams=[stream])
    with client(handle, timeout_s=0.2) as http:
        assert_unavailable(http.post("/generate_stream", json=BODY))
    assert stream.cancelled


def test_stalled_stream_ends_with_an_error_event() -> None:
    stream = FakeStream([[DELTA]], hang=True)
    handle = FakeHandle(streams=[stream])
    with client(handle, timeout_s=0.2) as http:
        r = http.post("/generate_stream", json=BODY)
    assert r.status_code == 200
    events = sse(r.text)
    assert events[0]["token"]["id"] == 7 and events[-1]["error_type"] == "unhealthy"
    assert stream.cancelled


async def _collect(chunks: AsyncIterator[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    return [c async for c in chunks]


def test_a_finished_stream_is_not_cancelled() -> None:
    stream = FakeStream([[DELTA], [FINAL]])
    backend = HandleBackend(FakeHandle(streams=[stream]), request_timeout_s=5)  # type: ignore[arg-type]
    assert asyncio.run(_collect(backend.stream({"request_id": "r"}))) == [[DELTA], [FINAL]]
    assert not stream.cancelled


# ---- the setting ---------------------------------------------------------------------------------
def test_request_timeout_setting() -> None:
    assert AppSettings.from_args({}, env={}).request_timeout_s == 60.0
    assert AppSettings.from_args({"request_timeout_s": 2.5}, env={}).request_timeout_s == 2.5
    for bad in (0, -1, "10", True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="request_timeout_s must be a positive number"):
            AppSettings.from_args({"request_timeout_s": bad}, env={})


def test_a_slow_reader_does_not_time_its_stream_out() -> None:
    """The chunk timeout counts the wait for the replica, not the time the client takes to read."""
    backend = HandleBackend(FakeHandle(streams=[FakeStream([[DELTA], [DELTA], [FINAL]])]),  # type: ignore[arg-type]
                            request_timeout_s=0.05)

    async def slow_reader() -> list[list[dict[str, Any]]]:
        got = []
        async for chunk in backend.stream({"request_id": "r"}):
            got.append(chunk)
            await asyncio.sleep(0.2)
        return got

    assert asyncio.run(slow_reader()) == [[DELTA], [DELTA], [FINAL]]
