"""Headless load-test runner: one command runs a locust scenario and writes a report with plots.

    python -m loadtests.run_loadtest --scenario burst --duration 60 --model demo --out loadtests/results/burst
    python -m loadtests.run_loadtest --scenario zipf --host http://127.0.0.1:8000 --users 8
    python -m loadtests.run_loadtest --scenario mixed --config config.yaml --port 8011

Without --host it starts the server itself (`serve run CONFIG`, HTTP port rewritten to --port,
bound to 127.0.0.1) and stops it afterwards (Ctrl-C, as a user would). It runs
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from loadtests.scenarios.phases import burst_phases

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "burst": REPO / "loadtests" / "locustfile_burst.py",
    "zipf": REPO / "loadtests" / "locustfile_zipf.py",
    "mixed": REPO / "loadtests" / "locustfile_mixed.py",
}
DPI = 70  # small PNGs: they are committed under loadtests/results/
ADMIN_TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"


def admin_headers() -> dict[str, str]:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---- server -------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_run(config: Path, port: int, model: str = "", startup_timeout_s: float = 300.0) -> Iterator[str]:
    """`serve run` a copy of `config` on 127.0.0.1:`port`; yields the URL; stops it on exit.

    With `model`, only the config's first application is served, with its `model` arg replaced
    (e.g. "demo": the random-weight demo model the README's load-test numbers were measured on).
    """
    import yaml

    data = yaml.safe_load(config.read_text())
    if model:
        first = dict(data["applications"][0])
        first["args"] = {**first.get("args", {}), "model": model}
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
                self._stop_event.wait(max(0.0, self.interval_s - (time.time() - t)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=15)


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


def summarize(run: Run, scenario: str) -> dict[str, Any]:
    if scenario == "burst":
        phases = burst_phases(run.duration)
    else:
        phases = [("all", 0.0, run.duration)]
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
    if scenario == "burst":
        _, a, b = burst_phases(run.duration)[1]
        ax.axvspan(a, b, color="orange", alpha=0.12, label="burst")


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
    return files


def write_html(summary: dict[str, Any], md: str, images: Sequence[str], out: Path) -> None:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in md.splitlines() if line.startswith("| ") and not line.startswith("| phase")
    )
    header = next(line for line in md.splitlines() if line.startswith("| phase"))
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in header.strip("|").split("|"))
    imgs = "".join(f'<figure><img src="{html.escape(i)}" alt="{html.escape(i)}"></figure>' for i in images)
    (out / "report.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Load test: {html.escape(summary['scenario'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:8px}}</style>
</head><body>
<h1>Load test: {html.escape(summary['scenario'])}, {summary['duration_s']} s</h1>
<h2>Summary</h2><table><tr>{head}</tr>{rows}</table>
<h2>Plots</h2>{imgs}
<h2>Raw summary</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>
</body></html>
""")


def write_report(run: Run, scenario: str, out: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = summarize(run, scenario)
    if meta:
        summary["meta"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
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
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    if args.adapters:
        env["LOADTEST_ADAPTERS"] = args.adapters
    cmd = [sys.executable, "-m", "locust", "-f", str(SCENARIOS[args.scenario]), "--headless", "--host", url,
           "--csv", str(out / "locust"), "--only-summary", "--loglevel", "WARNING",
           # No --run-time: locust ignores it with a LoadTestShape; the shape ends the run at
           # --duration, and the loop below terminates locust if it overstays anyway.
           "--stop-timeout", "30", "--exit-code-on-error", "0"]
    sampler = ReplicaSampler(url)
    sampler.start()
    print(f"[loadtest] {args.scenario}: {args.duration:.0f} s, up to {args.users} users, "
          f"max {args.max_requests} requests -> {out}", flush=True)
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while proc.poll() is None:
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
                    proc.terminate()  # locust did not stop by itself: bound the run anyway
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)
            sampler.stop()
    if not events.exists():
        raise RuntimeError(f"locust wrote no events; see {out / 'locust.log'}")
    run = load_events(events, args.duration)
    run.replicas = [(t - run.start, n, load) for t, n, load in sampler.samples]
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="burst")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (the burst is 30%%-65%% of it)")
    p.add_argument("--users", type=int, default=16, help="users at the peak (burst) or throughout (zipf, mixed)")
    p.add_argument("--idle-users", type=int, default=1, help="users before and after the burst")
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests to /generate_stream")
    p.add_argument("--adapters", default="", help="comma-separated adapter ids (default: the server's)")
    p.add_argument("--host", default="", help="target a running server (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--config", type=Path, default=REPO / "config.yaml", help="Serve config to start without --host")
    p.add_argument("--port", type=int, default=8000, help="port for the server started without --host")
    p.add_argument("--model", default="", help="serve only the config's first app, with this model (e.g. demo)")
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "latest")
    args = p.parse_args(argv)
    if args.host and urlparse(args.host).hostname not in ("127.0.0.1", "localhost"):
        p.error("--host must be on 127.0.0.1 (this runner only loads the local machine)")
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = contextlib.nullcontext(args.host.rstrip("/")) if args.host else serve_run(args.config, args.port, args.model)
    with ctx as url:
        run = run_locust(args, url, args.out)
    meta = {"command": "python -m loadtests.run_loadtest " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.start))}
    summary = write_report(run, args.scenario, args.out, meta)
    print(markdown(summary), flush=True)
    print(f"[loadtest] report: {args.out / 'report.html'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
