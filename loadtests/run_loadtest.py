"""Headless load-test runner: one command runs a locust scenario and writes a report with plots.

    python -m loadtests.run_loadtest --scenario burst --duration 60 --model demo --out loadtests/results/burst
    python -m loadtests.run_loadtest --scenario zipf --host http://127.0.0.1:8000 --users 8
    python -m loadtests.run_loadtest --scenario mixed --config config.yaml --port 8011
    python -m loadtests.run_loadtest --scenario noisy --duration 120 --model demo --out loadtests/results/noisy
    python -m loadtests.run_loadtest --scenario noisy --duration 120 --model demo --app-arg engine_process=true
    python -m loadtests.run_loadtest --scenario noisy --duration 120 --model demo --haproxy

Without --host it starts the server itself (`serve run CONFIG`, HTTP port rewritten to --port,
bound to 127.0.0.1; `--app-arg KEY=VALUE` overrides one app arg, over the scenario's own) and stops
it afterwards (Ctrl-C, as a user would). It runs
`locust -f loadtests/locustfile_<scenario>.py --headless` as a subprocess (locust monkey-patches
the standard library with gevent; keeping it out of this process keeps this one plain), bounded by
--duration and --max-requests. Meanwhile it samples the number of model replicas and their engine
load once a second from GET /admin/stats (every live replica answers) and prints a progress line.
/admin/stats needs the admin token: the server this starts gets the admin API switched on with the
token in LORASERVE_ADMIN_TOKEN (a fresh random one when unset); with --host, set LORASERVE_ADMIN_TOKEN
to that server's token (without it the replica samples stay empty).

Output (--out): events.jsonl (one line per request, from the locustfile), locust_*.csv,
replicas.csv, summary.json, summary.md (table: throughput, p50/p95 TTFT and latency before/during/
after the burst, replica count), report.html and PNG plots: requests_per_s, latency, ttft, errors,
replicas, adapter_latency. Only 127.0.0.1 is ever targeted.

`--scenario noisy` (loadtests/scenarios/noisy.py): adapters B and C alone, then A1 and A2 flooding
beside them, against one replica started with the scenario's app args (fair scheduling, weights 1
and 2 for the floods, a per-adapter waiting bound); B's and C's users run in a locust process of
their own, apart from the floods' (LOCUST_PROCESSES). Locust always runs at the niceness Ray gives
the server's processes (`loadgen_niceness`). `--haproxy` starts the server with Serve's HAProxy
ingress. The report adds, per role and phase, TTFT,
refusals and how fast they came, the fair scheduler's weighted tokens per adapter (from
/admin/stats), the issue's bars and three more plots: ttft_by_role, requests_by_role, refusal_latency.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import html
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from loadtests.scenarios import noisy
from loadtests.scenarios.phases import burst_phases
from serve_app.__main__ import HAPROXY_ENV, SERVE_THROUGHPUT_ENV

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "burst": REPO / "loadtests" / "locustfile_burst.py",
    "zipf": REPO / "loadtests" / "locustfile_zipf.py",
    "mixed": REPO / "loadtests" / "locustfile_mixed.py",
    "noisy": REPO / "loadtests" / "locustfile_noisy.py",
}
# Ray runs its worker processes, every Serve actor among them (proxy, ingress, model replica), at
# nice 15 (Ray's `worker_niceness`, RAY_worker_niceness). A load generator at nice 0 on the same
# cores would get ~28x their CPU weight whenever both want a core, and its clients would be served
# first by the scheduler of the very machine they measure; real clients run elsewhere. So locust
# runs at the server's niceness: the two share the cores as equals.
RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"
RAY_DEFAULT_WORKER_NICENESS = 15


def loadgen_niceness() -> int:
    return int(os.environ.get(RAY_WORKER_NICENESS_ENV) or RAY_DEFAULT_WORKER_NICENESS)


# Locust processes of a scenario, (name, user classes) each; one process runs all its classes otherwise.
# The noisy scenario's light tenants get a process of their own, as separate clients would be: in one
# gevent loop with the hundred flooding users, B's and C's timings would carry those clients' delays.
LOCUST_PROCESSES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "noisy": (("light", ("LightB", "LightC")), ("flood", ("FloodA1", "FloodA2"))),
}
# App args a scenario needs on the server it starts (None: the key is removed from the config).
SCENARIO_APP_ARGS: dict[str, dict[str, Any]] = {"noisy": noisy.NOISY_APP_ARGS}
DPI = 70  # small PNGs: they are committed under loadtests/results/
ADMIN_TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"


def admin_headers() -> dict[str, str]:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---- server -------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_run(config: Path, port: int, model: str = "", startup_timeout_s: float = 300.0,
              app_args: dict[str, Any] | None = None, haproxy: bool = False) -> Iterator[str]:
    """`serve run` a copy of `config` on 127.0.0.1:`port`; yields the URL; stops it on exit.

    With `model`, only the config's first application is served, with its `model` arg replaced
    (e.g. "demo": the random-weight demo model the README's load-test numbers were measured on).
    `app_args` override that application's args too (a None value removes the key). `haproxy`: Serve's
    HAProxy ingress instead of its Python proxy (serve_app/__main__.py HAPROXY_ENV).
    """
    import yaml

    data = yaml.safe_load(config.read_text())
    if model:
        first = dict(data["applications"][0])
        args = {**first.get("args", {}), "model": model, **(app_args or {})}
        first["args"] = {k: v for k, v in args.items() if v is not None}
        data["applications"] = [first]
    data.setdefault("http_options", {})
    data["http_options"].update(host="127.0.0.1", port=port)
    # The replica sampler reads GET /admin/stats, which the admin API's token guards.
    os.environ.setdefault(ADMIN_TOKEN_ENV, secrets.token_hex(16))
    for application in data["applications"]:
        application["args"] = {**application.get("args", {}), "admin_enabled": True}
    tmp = Path(tempfile.mkdtemp(prefix="loadtest-"))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault(SERVE_THROUGHPUT_ENV, "1")  # as the README serves it (serve_app/__main__.py); "0": Serve's default
    if haproxy:
        env[HAPROXY_ENV] = "1"
    log = tmp / "serve.log"
    serve = Path(sys.executable).parent / "serve"
    cmd = [str(serve)] if serve.exists() else [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "run", str(path)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        print(f"[server] starting `serve run` on {url} (log: {log})", flush=True)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {startup_timeout_s}s; see {log}")
            time.sleep(1.0)
        print("[server] healthy", flush=True)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("[server] stopped", flush=True)


# ---- replica sampling ---------------------------------------------------------------------------
class ReplicaSampler(threading.Thread):
    """Once per `interval_s`: live model replicas and their summed engine load (GET /admin/stats)."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.samples: list[tuple[float, int, float]] = []  # (unix time, replicas, running + waiting)
        # (unix time, adapter -> the fair scheduler's counters summed over the replicas)
        self.fairness: list[tuple[float, dict[str, dict[str, float]]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop_event.is_set():
                t = time.time()
                with contextlib.suppress(Exception):
                    replicas = client.get(f"{self.url}/admin/stats", headers=admin_headers()).json()["replicas"]
                    load = sum(float(r["engine"].get("num_running", 0)) + float(r["engine"].get("num_waiting", 0))
                               for r in replicas)
                    self.samples.append((t, len(replicas), load))
                    self.fairness.append((t, sum_fairness(r["engine"].get("fairness") or {} for r in replicas)))
                self._stop_event.wait(max(0.0, self.interval_s - (time.time() - t)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=15)


def sum_fairness(per_replica: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Engine.stats()["fairness"] of every replica, the counters summed per adapter."""
    out: dict[str, dict[str, float]] = {}
    for accounts in per_replica:
        for adapter, a in accounts.items():
            acc = out.setdefault(adapter, {})
            for key in ("prefill_tokens", "decode_tokens", "admitted", "rejected", "queue_timeouts"):
                acc[key] = acc.get(key, 0.0) + float(a.get(key, 0))
    return out


class RefusalProbe(threading.Thread):
    """One flood request (role A1) every `interval_s` from this process while the floods run: how fast a
    refusal comes back to a client that is not one of locust's hundred gevent users on the same cores
    (a diagnostic beside the locust-measured numbers, which count that client's own delays too). At
    the load generator's niceness too (`loadgen_niceness`; Linux sets it per thread)."""

    def __init__(self, url: str, start_s: float, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.start_s, self.interval_s = url, start_s, interval_s
        self.samples: list[tuple[float, int, float]] = []  # (unix time sent, status, seconds to the answer)
        self._stop_event = threading.Event()

    def run(self) -> None:
        role = next(r for r in noisy.ROLES if r.name == "A1")
        body = {"inputs": "x" * role.prompt_chars,
                "parameters": {"adapter_id": role.adapter, "max_new_tokens": role.max_new_tokens}}
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), loadgen_niceness())
        if self._stop_event.wait(self.start_s):
            return
        with httpx.Client(timeout=60) as client:
            while not self._stop_event.is_set():
                t = time.time()
                with contextlib.suppress(httpx.HTTPError):
                    status = client.post(f"{self.url}/generate", json=body).status_code
                    self.samples.append((t, status, time.time() - t))
                self._stop_event.wait(max(0.0, self.interval_s - (time.time() - t)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=70)


# ---- statistics ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Run:
    start: float  # unix time of locust's test start
    duration: float
    requests: list[dict[str, Any]]
    replicas: list[tuple[float, int, float]]  # (seconds since start, replicas, load)
    fairness: list[tuple[float, dict[str, dict[str, float]]]] = field(default_factory=list)  # (s since start, ...)
    probe: list[tuple[float, int, float]] = field(default_factory=list)  # RefusalProbe's, times since start


def load_events(path: Path, duration: float) -> Run:
    start = None
    stop = None
    requests = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("event") == "start" and start is None:
                start = float(rec["t"])
            elif rec.get("event") == "stop":
                stop = float(rec["t"])
            elif rec.get("event") == "request":
                requests.append(rec)
    if start is None:
        start = min((r["t"] for r in requests), default=time.time())
    for r in requests:
        r["rel"] = r["t"] - start
    actual = (stop - start) if stop else duration
    return Run(start, max(1e-9, min(duration, actual) if stop else duration), requests, [])


def phase_stats(reqs: Sequence[dict[str, Any]], span_s: float) -> dict[str, Any]:
    ok = [r for r in reqs if r["error"] is None]
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    lat = [r["latency_s"] for r in ok]
    errors = Counter(str(r["error"]) for r in reqs if r["error"] is not None)
    tokens = sum(int(r.get("tokens") or 0) for r in ok)
    return {
        "requests": len(reqs),
        "ok": len(ok),
        "errors": dict(errors),
        "throughput_rps": _r(len(ok) / span_s if span_s > 0 else 0.0, 3),
        "tokens_per_s": _r(tokens / span_s if span_s > 0 else 0.0, 2),
        "ttft_p50_s": _r(percentile(ttfts, 50)),
        "ttft_p95_s": _r(percentile(ttfts, 95)),
        "latency_p50_s": _r(percentile(lat, 50)),
        "latency_p95_s": _r(percentile(lat, 95)),
    }


def scenario_phases(scenario: str, duration: float) -> list[tuple[str, float, float]]:
    if scenario == "burst":
        return burst_phases(duration)
    if scenario == "noisy":
        return noisy.noisy_phases(duration)
    return [("all", 0.0, duration)]


def summarize(run: Run, scenario: str) -> dict[str, Any]:
    phases = scenario_phases(scenario, run.duration)
    out_phases = []
    for name, a, b in phases:
        reqs = [r for r in run.requests if a <= r["rel"] < b or (name == phases[-1][0] and r["rel"] >= b)]
        reps = [n for t, n, _ in run.replicas if a <= t < b]
        out_phases.append({"phase": name, "start_s": round(a, 1), "end_s": round(b, 1), **phase_stats(reqs, b - a),
                           "replicas_min": min(reps, default=None), "replicas_max": max(reps, default=None)})
    per_adapter = {}
    by_adapter: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in run.requests:
        by_adapter[str(r["adapter"])].append(r)
    for adapter, reqs in sorted(by_adapter.items()):
        st = phase_stats(reqs, run.duration)
        per_adapter[adapter] = {k: st[k] for k in ("requests", "ok", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
                                                   "ttft_p95_s")}
    counts = [n for _, n, _ in run.replicas]
    return {
        "scenario": scenario,
        "duration_s": round(run.duration, 1),
        "phases": out_phases,
        "total": phase_stats(run.requests, run.duration),
        "replicas": {"min": min(counts, default=None), "max": max(counts, default=None), "samples": len(counts),
                     "first_at_max_s": next((round(t, 1) for t, n, _ in run.replicas if counts and n == max(counts)),
                                            None)},
        "adapters": per_adapter,
    }


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}{unit}" if x < 100 else f"{x:.0f}{unit}"
    return f"{x}{unit}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Load test: {summary['scenario']} ({summary['duration_s']} s)",
        "",
        "| phase | window (s) | requests | ok req/s | tokens/s | TTFT p50 (s) | TTFT p95 (s) | latency p50 (s) "
        "| latency p95 (s) | errors | replicas (min–max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [*summary["phases"], {"phase": "total", "start_s": 0.0, "end_s": summary["duration_s"],
                                 **summary["total"], "replicas_min": summary["replicas"]["min"],
                                 "replicas_max": summary["replicas"]["max"]}]
    for p in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "0"
        lines.append(
            f"| {p['phase']} | {p['start_s']:.0f}–{p['end_s']:.0f} | {p['requests']} | {_fmt(p['throughput_rps'])} "
            f"| {_fmt(p['tokens_per_s'])} | {_fmt(p['ttft_p50_s'])} | {_fmt(p['ttft_p95_s'])} "
            f"| {_fmt(p['latency_p50_s'])} | {_fmt(p['latency_p95_s'])} | {errors} "
            f"| {_fmt(p['replicas_min'])}–{_fmt(p['replicas_max'])} |"
        )
    r = summary["replicas"]
    lines += ["", f"Replicas: min {r['min']}, max {r['max']} ({r['samples']} samples, 1/s); "
                  f"first at max {r['first_at_max_s']} s into the run.", ""]
    meta = summary.get("meta") or {}
    if meta:
        lines += [f"Command: `{meta.get('command', '')}`; machine: {meta.get('machine', '')}; "
                  f"run at {meta.get('utc', '')} UTC.", ""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------
def _windows(run: Run, width: float) -> list[tuple[float, list[dict[str, Any]]]]:
    n = max(1, math.ceil(run.duration / width))
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for r in run.requests:
        i = min(n - 1, max(0, int(r["rel"] // width)))
        buckets[i].append(r)
    return [(i * width + width / 2, b) for i, b in enumerate(buckets)]


def _shade_burst(ax: Any, run: Run, scenario: str) -> None:
    if scenario in ("burst", "noisy"):
        _, a, b = scenario_phases(scenario, run.duration)[1]
        ax.axvspan(a, b, color="orange", alpha=0.12, label="burst" if scenario == "burst" else "floods")


# ---- the noisy-neighbour scenario ---------------------------------------------------------------
def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _role_requests(run: Run, role: noisy.Role, lo: float = -math.inf, hi: float = math.inf) -> list[dict[str, Any]]:
    return [r for r in run.requests if r["adapter"] == role.adapter and lo <= r["rel"] < hi]


def _weighted_tokens(run: Run, lo: float, hi: float) -> dict[str, float] | None:
    """Weighted tokens (prompt x prefill cost + generated x decode cost) the scheduler ran per adapter in
    [lo, hi), from the first and last /admin/stats samples inside it; None without two samples."""
    inside = [(t, f) for t, f in run.fairness if lo <= t <= hi]
    if len(inside) < 2:
        return None
    (_, first), (_, last) = inside[0], inside[-1]
    costs = {"prefill_tokens": float(noisy.NOISY_APP_ARGS["prefill_token_cost"]),  # type: ignore[arg-type]
             "decode_tokens": float(noisy.NOISY_APP_ARGS["decode_token_cost"])}  # type: ignore[arg-type]
    return {adapter: sum(cost * (c.get(k, 0.0) - first.get(adapter, {}).get(k, 0.0)) for k, cost in costs.items())
            for adapter, c in last.items()}


def noisy_summary(run: Run) -> dict[str, Any]:
    """Per phase (its measured window) and role: offered rate, outcomes, TTFT, refusal latency, tokens;
    the weighted tokens per adapter with the floods; the bars."""
    phases: dict[str, Any] = {}
    for name, a, b in noisy.noisy_phases(run.duration):
        lo, hi = noisy.measured_window(name, a, b)
        span = max(hi - lo, 1e-9)
        weighted = _weighted_tokens(run, lo, hi) or {}
        total_weighted = sum(weighted.values()) or math.nan
        roles: dict[str, Any] = {}
        for role in noisy.ROLES:
            reqs = _role_requests(run, role, lo, hi)
            if not reqs:
                continue
            ok = [r for r in reqs if r["error"] is None]
            refused = [r["latency_s"] for r in reqs if r["status"] == 429]
            ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
            lat = [r["latency_s"] for r in ok]
            roles[role.name] = {
                "adapter": role.adapter, "weight": role.weight, "offered_rps": _r(len(reqs) / span, 2),
                "requests": len(reqs), "ok": len(ok), "refused": len(refused),
                "other_errors": len(reqs) - len(ok) - len(refused),
                "ttft_p50_s": _r(percentile(ttfts, 50)), "ttft_p95_s": _r(percentile(ttfts, 95)),
                "latency_p50_s": _r(percentile(lat, 50)), "latency_p95_s": _r(percentile(lat, 95)),
                "refusal_p50_ms": _ms(percentile(refused, 50)), "refusal_p99_ms": _ms(percentile(refused, 99)),
                "refusal_max_ms": _ms(max(refused, default=None)) if refused else None,
                "generated_tokens_per_s": _r(sum(int(r.get("tokens") or 0) for r in ok) / span, 1),
                "weighted_tokens_per_s": _r(weighted[role.adapter] / span, 1) if role.adapter in weighted else None,
                "weighted_share": _r(weighted[role.adapter] / total_weighted, 4) if role.adapter in weighted else None,
            }
        phases[name] = {"window_s": [round(lo, 1), round(hi, 1)], "roles": roles}
    return {"phases": phases, "bars": noisy_bars(run, phases)}


def noisy_bars(run: Run, phases: dict[str, Any]) -> list[dict[str, Any]]:
    bars: list[dict[str, Any]] = []
    alone, flood = phases.get("alone", {}).get("roles", {}), phases.get("flood", {}).get("roles", {})
    for role in (r for r in noisy.ROLES if not r.flood):
        base, loaded = (alone.get(role.name) or {}).get("ttft_p95_s"), (flood.get(role.name) or {}).get("ttft_p95_s")
        ratio = loaded / base if base and loaded is not None else None
        bars.append({"bar": f"{role.name} p95 TTFT with the floods / alone", "value": _r(ratio, 2),
                     "limit": f"<= {noisy.TTFT_RATIO_BAR:g}x", "met": ratio is not None and ratio <= noisy.TTFT_RATIO_BAR,
                     "detail": f"{loaded} s / {base} s"})
        failed = [r for r in _role_requests(run, role) if r["error"] is not None]  # the whole run
        bars.append({"bar": f"{role.name} requests refused or failed (whole run)", "value": len(failed),
                     "limit": "0", "met": not failed,
                     "detail": ", ".join(f"{k}: {v}" for k, v in Counter(str(r["error"]) for r in failed).items())})
    lo, hi = phases.get("flood", {}).get("window_s", [0.0, 0.0])
    refusals = [r["latency_s"] for role in noisy.ROLES if role.flood for r in _role_requests(run, role, lo, hi)
                if r["status"] == 429]
    p99 = percentile(refusals, 99)
    probe = [lat for t, status, lat in run.probe if status == 429 and lo <= t < hi]
    probe_text = (f"; a single client beside locust: p50 {_ms(percentile(probe, 50))} / p99 {_ms(percentile(probe, 99))} "
                  f"ms over {len(probe)} refusals" if probe else "")
    bars.append({"bar": "A1 + A2 refusals (429) with the floods, from sending to the answer (locust): p99",
                 "value": _ms(p99), "limit": f"<= {1000 * noisy.REFUSAL_P99_BAR_S:g} ms",
                 "met": p99 is not None and p99 <= noisy.REFUSAL_P99_BAR_S,
                 "detail": f"{len(refusals)} refusals, p50 {_ms(percentile(refusals, 50))} ms, max "
                           f"{_ms(max(refusals, default=None)) if refusals else None} ms{probe_text}"})
    a1, a2 = (flood.get(n) or {} for n in ("A1", "A2"))
    if a1.get("weighted_tokens_per_s") and a2.get("weighted_tokens_per_s"):
        ratio = a2["weighted_tokens_per_s"] / a1["weighted_tokens_per_s"]
        bars.append({"bar": "A2 : A1 weighted tokens (weights 2 : 1)", "value": _r(ratio, 2), "limit": "2 +- 10%",
                     "met": abs(ratio - 2.0) <= 0.2, "detail": "the fair scheduler's own counters (/admin/stats)"})
    return bars


def noisy_markdown(summary: dict[str, Any]) -> str:
    n = summary["noisy"]
    lines = ["## Noisy neighbours", "",
             "| role | phase | adapter | weight | offered req/s | requests | ok | refused (429) | other errors "
             "| TTFT p50 / p95 (s) | latency p50 / p95 (s) | refusal p50 / p99 / max (ms) | generated tok/s "
             "| weighted tok/s | share of weighted tokens |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for phase, p in n["phases"].items():
        for role, r in p["roles"].items():
            share = f"{100 * r['weighted_share']:.1f}%" if r.get("weighted_share") is not None else "–"
            lines.append(
                f"| {role} | {phase} ({p['window_s'][0]:.0f}–{p['window_s'][1]:.0f} s) | {r['adapter']} | {r['weight']:g} "
                f"| {_fmt(r['offered_rps'])} | {r['requests']} | {r['ok']} | {r['refused']} | {r['other_errors']} "
                f"| {_fmt(r['ttft_p50_s'])} / {_fmt(r['ttft_p95_s'])} | {_fmt(r['latency_p50_s'])} / {_fmt(r['latency_p95_s'])} "
                f"| {_fmt(r['refusal_p50_ms'])} / {_fmt(r['refusal_p99_ms'])} / {_fmt(r['refusal_max_ms'])} "
                f"| {_fmt(r['generated_tokens_per_s'])} | {_fmt(r['weighted_tokens_per_s'])} | {share} |")
    lines += ["", "Bars:", ""]
    for bar in n["bars"]:
        verdict = "met" if bar["met"] else "**not met**"
        detail = f" ({bar['detail']})" if bar.get("detail") else ""
        lines.append(f"- {bar['bar']}: **{bar['value']}** (bar {bar['limit']}) {verdict}{detail}")
    return "\n".join(lines) + "\n"


def noisy_plots(run: Run, out: Path, save: Any, plt: Any) -> None:
    win = _windows(run, max(2.0, run.duration / 30))
    fig, ax = plt.subplots(figsize=(7, 3))
    for role in (r for r in noisy.ROLES if not r.flood):
        ys = [percentile([r["ttft_s"] for r in b if r["adapter"] == role.adapter and r["error"] is None
                          and r.get("ttft_s") is not None], 95) for _, b in win]
        ax.plot([t for t, _ in win], [math.nan if y is None else y for y in ys], marker="o", label=f"{role.name} p95")
    _shade_burst(ax, run, "noisy")
    ax.set(xlabel="time (s)", ylabel="seconds", title="Light adapters' time to first token (p95)")
    ax.legend(fontsize=8)
    save(fig, "ttft_by_role.png")

    per_s = _windows(run, 2.0)
    fig, ax = plt.subplots(figsize=(7, 3))
    for role in noisy.ROLES:
        line, = ax.plot([t for t, _ in per_s], [sum(r["adapter"] == role.adapter and r["error"] is None for r in b) / 2.0
                                                 for _, b in per_s], label=f"{role.name} ok")
        if role.flood:
            ax.plot([t for t, _ in per_s], [sum(r["adapter"] == role.adapter and r["status"] == 429 for r in b) / 2.0
                                            for _, b in per_s], linestyle="--", color=line.get_color(),
                    label=f"{role.name} refused")
    _shade_burst(ax, run, "noisy")
    ax.set(xlabel="time (s)", ylabel="requests/s (by start time)", title="Requests per second by role")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=7, ncol=3)
    save(fig, "requests_by_role.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    refused = [1000 * r["latency_s"] for r in run.requests if r["status"] == 429]
    if refused:
        ax.hist(refused, bins=40, color="tab:red")
    ax.axvline(1000 * noisy.REFUSAL_P99_BAR_S, color="k", linestyle=":", label="bar (100 ms)")
    ax.set(xlabel="ms from sending to the 429", ylabel="requests", title=f"Refusal latency ({len(refused)} refusals)")
    ax.legend(fontsize=8)
    save(fig, "refusal_latency.png")


def plots(run: Run, summary: dict[str, Any], out: Path, scenario: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        files.append(name)

    # requests/s (ok and failed), 1-s buckets
    per_s = _windows(run, 1.0)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([t for t, _ in per_s], [sum(r["error"] is None for r in b) for _, b in per_s], label="ok")
    ax.plot([t for t, _ in per_s], [sum(r["error"] is not None for r in b) for _, b in per_s], label="failed")
    _shade_burst(ax, run, scenario)
    ax.set(xlabel="time (s)", ylabel="requests/s (by start time)", title="Requests per second")
    ax.legend()
    save(fig, "requests_per_s.png")

    # p50/p95 latency and TTFT over time, 5-s windows
    win = _windows(run, max(2.0, run.duration / 20))
    for key, name, title in (("latency_s", "latency.png", "Request latency"),
                             ("ttft_s", "ttft.png", "Time to first token (streaming)")):
        fig, ax = plt.subplots(figsize=(7, 3))
        for q in (50, 95):
            ys = [percentile([r[key] for r in b if r["error"] is None and r.get(key) is not None], q)
                  for _, b in win]
            ax.plot([t for t, _ in win], [math.nan if y is None else y for y in ys], marker="o", label=f"p{q}")
        _shade_burst(ax, run, scenario)
        ax.set(xlabel="time (s)", ylabel="seconds", title=title)
        ax.legend()
        save(fig, name)

    # errors by type
    fig, ax = plt.subplots(figsize=(5, 3))
    errors = summary["total"]["errors"]
    if errors:
        ax.bar(list(errors), list(errors.values()), color="tab:red")
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel="requests", title=f"Errors by type ({summary['total']['requests']} requests)")
    save(fig, "errors.png")

    # replica count (and aggregate engine load) over time
    fig, ax = plt.subplots(figsize=(7, 3))
    if run.replicas:
        ts = [t for t, _, _ in run.replicas]
        ax.step(ts, [n for _, n, _ in run.replicas], where="post", color="tab:green", label="replicas")
        ax2 = ax.twinx()
        ax2.plot(ts, [load for _, _, load in run.replicas], color="tab:gray", alpha=0.6, label="engine load")
        ax2.set_ylabel("running + waiting (all replicas)")
    ax.set(xlabel="time (s)", ylabel="model replicas", title="Replica count and aggregate engine load")
    ax.set_ylim(0, max([n for _, n, _ in run.replicas], default=1) + 1)
    _shade_burst(ax, run, scenario)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    save(fig, "replicas.png")

    # per-adapter latency
    fig, ax = plt.subplots(figsize=(7, 3))
    adapters = summary["adapters"]
    names = list(adapters)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [adapters[a]["latency_p50_s"] or 0 for a in names], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [adapters[a]["latency_p95_s"] or 0 for a in names], width=0.4, label="p95")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="seconds", title="Latency per adapter")
    ax.legend()
    save(fig, "adapter_latency.png")
    if scenario == "noisy":
        noisy_plots(run, out, save, plt)
    return files


def _html_tables(md: str) -> str:
    """Every markdown table of `md` as an HTML table (first line the header, the --- line skipped), and
    its bullet lines as a list."""
    parts: list[str] = []
    rows: list[str] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("| "):
            if not line.startswith("| ---"):
                tag = "th" if not rows else "td"
                cells = "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in line.strip("|").split("|"))
                rows.append(f"<tr>{cells}</tr>")
            continue
        if rows:
            parts.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.startswith("- "):
            parts.append(f"<p>{html.escape(line[2:].replace('**', ''))}</p>")
    return "".join(parts)


def write_html(summary: dict[str, Any], md: str, images: Sequence[str], out: Path) -> None:
    tables = _html_tables(md)
    imgs = "".join(f'<figure><img src="{html.escape(i)}" alt="{html.escape(i)}"></figure>' for i in images)
    (out / "report.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Load test: {html.escape(summary['scenario'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:8px}}</style>
</head><body>
<h1>Load test: {html.escape(summary['scenario'])}, {summary['duration_s']} s</h1>
<h2>Summary</h2>{tables}
<h2>Plots</h2>{imgs}
<h2>Raw summary</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>
</body></html>
""")


def write_report(run: Run, scenario: str, out: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = summarize(run, scenario)
    if scenario == "noisy":
        summary["noisy"] = noisy_summary(run)
    if meta:
        summary["meta"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    if scenario == "noisy":
        md += "\n" + noisy_markdown(summary)
    (out / "summary.md").write_text(md)
    with open(out / "replicas.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "replicas", "engine_load"])
        w.writerows((round(t, 2), n, load) for t, n, load in run.replicas)
    images = plots(run, summary, out, scenario)
    write_html(summary, md, images, out)
    return summary


# ---- the run ------------------------------------------------------------------------------------
def run_locust(args: argparse.Namespace, url: str, out: Path) -> Run:
    events = out / "events.jsonl"
    events.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        LOADTEST_EVENTS=str(events), LOADTEST_DURATION=str(args.duration), LOADTEST_USERS=str(args.users),
        LOADTEST_IDLE_USERS=str(args.idle_users), LOADTEST_MAX_REQUESTS=str(args.max_requests),
        LOADTEST_STREAM_FRACTION=str(args.stream_fraction),
        # One start for every locust process of the run (their phases count from it); each appends
        # whole lines to the same events file.
        LOADTEST_T0=repr(time.time()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    if args.adapters:
        env["LOADTEST_ADAPTERS"] = args.adapters
    cmd = ["nice", "-n", str(loadgen_niceness()),  # see RAY_DEFAULT_WORKER_NICENESS
           sys.executable, "-m", "locust", "-f", str(SCENARIOS[args.scenario]), "--headless", "--host", url,
           "--only-summary", "--loglevel", "WARNING",
           # No --run-time: locust ignores it with a LoadTestShape; the shape ends the run at
           # --duration, and the loop below terminates locust if it overstays anyway.
           "--stop-timeout", "30", "--exit-code-on-error", "0"]
    groups = LOCUST_PROCESSES.get(args.scenario) or (("", ()),)
    sampler = ReplicaSampler(url)
    sampler.start()
    probe = None
    if args.scenario == "noisy":
        (_, _, split), _ = noisy.noisy_phases(args.duration)
        probe = RefusalProbe(url, split + noisy.FLOOD_WARMUP_S)
        probe.start()
    print(f"[loadtest] {args.scenario}: {args.duration:.0f} s, up to {args.users} users, "
          f"max {args.max_requests} requests -> {out}", flush=True)
    with contextlib.ExitStack() as stack:
        procs = []
        for name, classes in groups:
            suffix = f"_{name}" if name else ""
            log = stack.enter_context(open(out / f"locust{suffix}.log", "wb"))
            procs.append(subprocess.Popen([*cmd, "--csv", str(out / f"locust{suffix}"), *classes], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        t0 = time.time()
        try:
            while any(proc.poll() is None for proc in procs):
                time.sleep(5.0)
                done = failed = 0
                with contextlib.suppress(OSError):
                    for line in events.read_text().splitlines():
                        if '"event": "request"' in line:
                            done += 1
                            failed += '"error": null' not in line
                reps = sampler.samples[-1][1] if sampler.samples else "?"
                print(f"[loadtest] t={time.time() - t0:5.0f}s requests={done} failed={failed} replicas={reps}",
                      flush=True)
                if time.time() - t0 > args.duration + 120:
                    break  # locust did not stop by itself: bound the run anyway (terminated below)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(timeout=60)
            sampler.stop()
            if probe is not None:
                probe.stop()
    if not events.exists():
        raise RuntimeError(f"locust wrote no events; see {out}/locust*.log")
    run = load_events(events, args.duration)
    run.replicas = [(t - run.start, n, load) for t, n, load in sampler.samples]
    run.fairness = [(t - run.start, f) for t, f in sampler.fairness]
    run.probe = [(t - run.start, status, lat) for t, status, lat in (probe.samples if probe else [])]
    return run


def parse_app_args(items: Sequence[str]) -> dict[str, Any]:
    """`--app-arg KEY=VALUE` items as a dict, each VALUE read as YAML (as config.yaml would hold it)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--app-arg takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="burst")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (the burst is 30%%-65%% of it)")
    p.add_argument("--users", type=int, default=None,
                   help="users at the peak (burst), throughout (zipf, mixed: 16) or per flooding adapter (noisy: 48)")
    p.add_argument("--idle-users", type=int, default=1, help="users before and after the burst")
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests to /generate_stream")
    p.add_argument("--adapters", default="", help="comma-separated adapter ids (default: the server's)")
    p.add_argument("--host", default="", help="target a running server (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--config", type=Path, default=REPO / "config.yaml", help="Serve config to start without --host")
    p.add_argument("--port", type=int, default=8000, help="port for the server started without --host")
    p.add_argument("--model", default="", help="serve only the config's first app, with this model (e.g. demo)")
    p.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override one app arg of the server this starts (VALUE as YAML: true, 128, null); repeatable")
    p.add_argument("--haproxy", action="store_true",
                   help="start the server with Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1; README)")
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "latest")
    args = p.parse_args(argv)
    try:
        overrides = parse_app_args(args.app_arg)
    except ValueError as exc:
        p.error(str(exc))
    args.users = args.users or (48 if args.scenario == "noisy" else 16)
    if args.host and urlparse(args.host).hostname not in ("127.0.0.1", "localhost"):
        p.error("--host must be on 127.0.0.1 (this runner only loads the local machine)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or ("demo" if args.scenario in SCENARIO_APP_ARGS else "")  # its roles are demo adapters
    ctx = (contextlib.nullcontext(args.host.rstrip("/")) if args.host
           else serve_run(args.config, args.port, model,
                          app_args={**SCENARIO_APP_ARGS.get(args.scenario, {}), **overrides},
                          haproxy=args.haproxy))
    with ctx as url:
        run = run_locust(args, url, args.out)
    meta = {"command": "python -m loadtests.run_loadtest " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.start))}
    write_report(run, args.scenario, args.out, meta)
    print((args.out / "summary.md").read_text(), flush=True)
    print(f"[loadtest] report: {args.out / 'report.html'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
