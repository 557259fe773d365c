"""The load-test report (loadtests/run_loadtest.py) from a synthetic event log: phases, percentiles,
errors and replica counts land in summary.json / summary.md / report.html and the PNGs, with the
numbers the events imply. The real ~30-second burst run against Ray Serve is
tests/test_autoscaling_e2e.py::test_loadtest_smoke (it shares that module's Serve instance).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from loadtests import run_loadtest
from loadtests.run_loadtest import (
    Run,
    load_events,
    parse_app_args,
    percentile,
    run_locust,
    serve_run,
    write_report,
)
from loadtests.scenarios.phases import burst_phases
from serve_app.__main__ import HAPROXY_ENV, SERVE_THROUGHPUT_ENV


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_burst_phases_cover_the_run() -> None:
    phases = burst_phases(60)
    assert [p[0] for p in phases] == ["before", "during", "after"]
    assert phases[0][1] == 0 and phases[-1][2] == 60
    assert all(a[2] == b[1] for a, b in itertools.pairwise(phases))


def _synthetic(path: Path, start: float) -> None:
    """20 s: 1 req/s before (ttft 0.1), 10 req/s during 6-13 s (ttft 0.5, some 429s), 1 req/s after."""
    lines = [{"event": "start", "t": start}]
    for i in range(200):
        rel = i * 0.1
        during = 6.0 <= rel < 13.0
        if not during and i % 10:
            continue  # 1 req/s outside the burst
        error = "429" if during and i % 7 == 0 else None
        lines.append({"event": "request", "t": start + rel, "kind": "generate_stream", "adapter": f"a{i % 3}",
                      "status": 429 if error else 200, "error": error, "latency_s": 2.0 if during else 0.4,
                      "ttft_s": None if error else (0.5 if during else 0.1), "tokens": 0 if error else 8})
    lines.append({"event": "stop", "t": start + 20.0})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_report_from_synthetic_events(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    _synthetic(events, start=1000.0)
    run = load_events(events, duration=20.0)
    run.replicas = [(float(t), 2 if 8 <= t < 15 else 1, 0.0) for t in range(20)]
    summary = write_report(Run(run.start, run.duration, run.requests, run.replicas), "burst", tmp_path)

    phases = {p["phase"]: p for p in summary["phases"]}
    assert phases["before"]["requests"] == 6  # t = 0..5 s
    assert phases["during"]["requests"] == 70 and phases["during"]["errors"] == {"429": 10}
    assert phases["before"]["ttft_p50_s"] == pytest.approx(0.1)
    assert phases["during"]["ttft_p95_s"] == pytest.approx(0.5)
    assert phases["during"]["throughput_rps"] == pytest.approx(60 / 7.0, rel=1e-3)
    assert phases["during"]["replicas_max"] == 2 and phases["before"]["replicas_max"] == 1
    assert summary["replicas"] == {"min": 1, "max": 2, "samples": 20, "first_at_max_s": 8.0}
    assert set(summary["adapters"]) == {"a0", "a1", "a2"}

    md = (tmp_path / "summary.md").read_text()
    assert "| during | 6–13 | 70 |" in md and "429: 10" in md
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Summary</h2>" in html and "replicas.png" in html
    for name in ("requests_per_s.png", "latency.png", "ttft.png", "errors.png", "replicas.png",
                 "adapter_latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_peer_benchmark_rounds_interleave_and_report_medians() -> None:
    from loadtests.bench_peers import QUICK_WORKLOADS, CaseResult, median_tps, round_name, throughput_cases

    cases = throughput_cases(QUICK_WORKLOADS, n_adapters=4, vocab=400, rounds=3)
    names = [c.name for c in cases]
    assert names[0] == "warm-up" and not cases[0].timed and all(c.timed for c in cases[1:])
    assert len(names) == len(set(names)) == 1 + 3 * 2 * len(QUICK_WORKLOADS)
    # Round after round, every workload's base and mixed case in each round; the first round keeps plain names.
    assert names[1:5] == ["issue-14: base only", "issue-14: mixed", "decode-heavy: base only", "decode-heavy: mixed"]
    assert names[5] == round_name("issue-14: base only", 1) == "issue-14: base only (round 2)"
    # Every round runs the same requests: only the timing may differ.
    assert cases[1].work == cases[5].work and cases[2].adapters == cases[6].adapters
    results = {round_name("w: base only", r): CaseResult(tps, []) for r, tps in enumerate([300.0, 100.0, 250.0])}
    assert median_tps(results, "w: base only", 3) == 250.0
    assert median_tps(results, "w: base only", 1) == 300.0


def test_app_arg_overrides_parse_as_yaml() -> None:
    assert parse_app_args(["engine_process=true", "max_num_batched_tokens=128", "autoscaling_config=null",
                           "adapter_weights={a: 2}"]) == {
        "engine_process": True, "max_num_batched_tokens": 128, "autoscaling_config": None,
        "adapter_weights": {"a": 2}}
    for bad in ("engine_process", "=true"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_app_args([bad])


class FakeProcess:
    """Stands in for a subprocess the runner starts (`serve run`, locust): records its command and
    environment; as a locust process it appends a start event and one request to the events file."""

    def __init__(self, cmd: list[str], returncode: int, launched: list[FakeProcess], env: dict[str, str],
                 **_: Any) -> None:
        self.cmd, self.env, self.returncode = list(cmd), dict(env), returncode
        launched.append(self)
        if "LOADTEST_EVENTS" in env:
            t0 = float(env["LOADTEST_T0"])
            with open(env["LOADTEST_EVENTS"], "a", encoding="utf-8") as f:
                f.write(json.dumps({"event": "start", "t": t0}) + "\n")
                f.write(json.dumps({"event": "request", "t": t0 + 1, "kind": "generate", "adapter": cmd[-1],
                                    "status": 200, "error": None, "latency_s": 0.1, "ttft_s": None,
                                    "tokens": 1}) + "\n")

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def send_signal(self, sig: int) -> None: ...


def fake_popen(monkeypatch: pytest.MonkeyPatch, returncode: int) -> list[FakeProcess]:
    launched: list[FakeProcess] = []
    monkeypatch.setattr(run_loadtest.subprocess, "Popen",
                        lambda cmd, **kw: FakeProcess(cmd, returncode, launched, **kw))
    return launched


def test_serve_run_passes_the_ingress_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--haproxy` reaches `serve run`'s environment (Serve reads it once, at start); without it the
    server keeps Serve's Python proxy, in the throughput-optimized mode the README serves with."""
    monkeypatch.setenv(run_loadtest.ADMIN_TOKEN_ENV, "test-token")
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    monkeypatch.delenv(SERVE_THROUGHPUT_ENV, raising=False)
    for haproxy in (True, False):
        launched = fake_popen(monkeypatch, returncode=1)  # exits at once: serve_run reports it
        with pytest.raises(RuntimeError, match="exited with 1"), serve_run(
                run_loadtest.REPO / "config.yaml", 8999, model="demo", haproxy=haproxy):
            pass
        (proc,) = launched
        assert proc.cmd[-2] == "run" and proc.env[SERVE_THROUGHPUT_ENV] == "1"
        assert proc.env.get(HAPROXY_ENV) == ("1" if haproxy else None)


def test_noisy_tenants_get_a_locust_process_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The light adapters' users and the floods' run in separate locust processes (as separate clients
    would), with one start time, each with its own CSV prefix, into one event log, at the server's
    CPU priority."""
    monkeypatch.delenv(run_loadtest.RAY_WORKER_NICENESS_ENV, raising=False)
    launched = fake_popen(monkeypatch, returncode=0)
    args = argparse.Namespace(scenario="noisy", duration=1.0, users=2, idle_users=1, max_requests=10,
                              stream_fraction=0.5, adapters="")
    run = run_locust(args, "http://127.0.0.1:9", tmp_path)  # nothing listens there: the samplers stay empty
    assert [p.cmd[-2:] for p in launched] == [["LightB", "LightC"], ["FloodA1", "FloodA2"]]
    # At the niceness Ray gives the server's processes (its worker_niceness), not above them.
    assert all(p.cmd[:3] == ["nice", "-n", "15"] and p.cmd[4:6] == ["-m", "locust"] for p in launched)
    csvs = [p.cmd[p.cmd.index("--csv") + 1] for p in launched]
    assert csvs == [str(tmp_path / "locust_light"), str(tmp_path / "locust_flood")]
    (t0,) = {p.env["LOADTEST_T0"] for p in launched}
    assert run.start == float(t0) and sorted(r["adapter"] for r in run.requests) == ["FloodA2", "LightC"]
    assert all(r["rel"] == 1.0 for r in run.requests)

    launched.clear()
    run_locust(argparse.Namespace(**{**vars(args), "scenario": "burst"}), "http://127.0.0.1:9", tmp_path)
    (burst,) = launched  # one process runs all of a scenario's users otherwise
    assert burst.cmd[-2:] == ["--csv", str(tmp_path / "locust")]
