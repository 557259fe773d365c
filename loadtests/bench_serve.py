"""Serve overhead benchmark: the same workload through HTTP to the Ray Serve app and directly to the engine.

    python -m loadtests.bench_serve            # 64 requests x 128 tokens over the demo model's 8 adapters + base
    python -m loadtests.bench_serve --quick    # 16 requests x 32 tokens, for a smoke run

One process, one run, one machine: the in-process Engine (no Ray, no HTTP) before Ray starts, the
Serve app (`serve_app.app:build_app`, the same engine settings) on 127.0.0.1 through
`POST /generate` and `POST /generate_stream`, then the in-process Engine again after Ray has shut
down. Each path runs --repeats times, interleaved, and its best run counts: on a shared 2-core
machine other work steals CPU at random, and the best run is the least disturbed one. Every request
arrives at once; greedy decoding makes all paths do exactly the same work (checked: same tokens).
Throughput = generated tokens / wall time. The bar (issue 4): Serve >= 0.85x in-process.
Prints a markdown table; writes it and a JSON file with every run to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm import tqdm

from engine import Engine, SamplingParams
from models.demo import DEMO_ADAPTERS
from models.resolve import resolve_model
from serve_app.core import DEFAULT_STREAM_MESSAGES_PER_S
from serve_app.settings import AppSettings

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serving", "many", "adapters", "batch", "cache", "block", "token", "model", "paged", "attention", "decode", "prefill", "queue", "ray", "serve", "base", "rank", "alpha", "scale"]
BAR = 0.85
WARMUP = 16  # requests run (untimed) before a path's first timed run
IN_PROCESS = "in-process Engine"
SERVE_GENERATE = "Serve HTTP /generate"
SERVE_STREAM = "Serve HTTP /generate_stream (SSE)"


@dataclass(frozen=True)
class Job:
    prompt: str
    adapter: str | None
    max_new_tokens: int


@dataclass
class Row:
    path: str
    requests: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def make_jobs(n: int, new_tokens: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    adapters: list[str | None] = [None, *(a[0] for a in DEMO_ADAPTERS)]
    return [Job(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48))), adapters[i % len(adapters)],
                new_tokens) for i in range(n)]


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": "demo", "num_kv_blocks": 2048, "max_model_len": 1024, "max_num_seqs": 64,
            "max_num_batched_tokens": 512, "max_waiting": 1024, "replica_num_cpus": 1,
            "torch_threads": args.torch_threads, "stream_messages_per_s": args.stream_messages_per_s}


# ---- in-process ---------------------------------------------------------------------------------
def run_in_process(args: argparse.Namespace, jobs: list[Job], runs: int) -> tuple[list[Row], list[list[int]]]:
    torch.set_num_threads(args.torch_threads)  # what the Serve replica uses too
    settings = AppSettings.from_args(app_args(args), env={})
    resolved = resolve_model("demo")
    engine = Engine(settings.engine_config(resolved.path, resolved.adapters))

    async def go(batch: list[Job], bar: tqdm | None) -> list[list[int]]:
        async def one(job: Job) -> list[int]:
            out = await engine.complete(job.prompt, SamplingParams(max_new_tokens=job.max_new_tokens),
                                        adapter_id=job.adapter)
            if bar is not None:
                bar.update(out.generated_tokens)
            return list(out.token_ids)

        return list(await asyncio.gather(*(one(j) for j in batch)))

    rows: list[Row] = []
    ids: list[list[int]] = []
    try:
        asyncio.run(go(jobs[:WARMUP], None))  # warm-up (first-call allocations)
        for _ in range(runs):
            bar = tqdm(total=sum(j.max_new_tokens for j in jobs), desc="in-process", unit="tok", leave=False,
                       mininterval=1.0)
            start = time.perf_counter()
            ids = asyncio.run(go(jobs, bar))
            rows.append(Row(IN_PROCESS, len(jobs), sum(len(t) for t in ids), time.perf_counter() - start))
            bar.close()
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
    return rows, ids


# ---- through Serve ------------------------------------------------------------------------------
async def http_generate(url: str, jobs: list[Job], bar: tqdm | None) -> list[list[int]]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(job: Job) -> list[int]:
            r = await client.post("/generate", json={"inputs": job.prompt, "parameters": {
                "adapter_id": job.adapter, "max_new_tokens": job.max_new_tokens, "details": True}})
            r.raise_for_status()
            tokens = [t["id"] for t in r.json()["details"]["tokens"]]
            if bar is not None:
                bar.update(len(tokens))
            return tokens

        return list(await asyncio.gather(*(one(j) for j in jobs)))


async def http_stream(url: str, jobs: list[Job], bar: tqdm | None) -> list[list[int]]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(job: Job) -> list[int]:
            tokens: list[int] = []
            body = {"inputs": job.prompt, "parameters": {"adapter_id": job.adapter, "max_new_tokens": job.max_new_tokens}}
            async with client.stream("POST", "/generate_stream", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        tokens.append(event["token"]["id"])
                        if bar is not None:
                            bar.update(1)
            return tokens

        return list(await asyncio.gather(*(one(j) for j in jobs)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_serve(args: argparse.Namespace, jobs: list[Job]) -> tuple[list[Row], list[list[list[int]]]]:
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, namespace="serve", log_to_driver=False)
    rows: list[Row] = []
    outputs: list[list[list[int]]] = []
    paths = ((SERVE_GENERATE, http_generate), (SERVE_STREAM, http_stream))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The admin API (GET /admin/stats, read at the end) needs a bearer token: a fresh one per run.
        token = secrets.token_hex(16)
        serve.run(build_app({**app_args(args), "admin_enabled": True, "admin_token": token}), name="bench",
                  route_prefix="/")
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the Serve app did not become healthy")
            time.sleep(0.5)
        for _, fn in paths:
            asyncio.run(fn(url, jobs[:WARMUP], None))  # warm-up
        for _ in range(args.repeats):
            for label, fn in paths:
                bar = tqdm(total=sum(j.max_new_tokens for j in jobs), desc=label, unit="tok", leave=False,
                           mininterval=1.0)
                start = time.perf_counter()
                ids = asyncio.run(fn(url, jobs, bar))
                rows.append(Row(label, len(jobs), sum(len(t) for t in ids), time.perf_counter() - start))
                bar.close()
                outputs.append(ids)
        stats = httpx.get(f"{url}/admin/stats", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}).json()["replicas"][0]
        print(f"Serve replica: max batch {stats['engine']['max_batch_seqs']} sequences, "
              f"{stats['metrics']['stream_deltas']} streamed tokens in {stats['metrics']['stream_chunks']} chunks")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows, outputs


def best(rows: list[Row], path: str) -> Row:
    return max((r for r in rows if r.path == path), key=lambda r: r.tokens_per_s)


def table(rows: list[Row], base: Row) -> str:
    lines = ["| path | requests | generated tokens | wall s (best run) | tokens/s | vs in-process |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.path} | {r.requests} | {r.tokens} | {r.seconds:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.tokens_per_s / base.tokens_per_s:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 requests x 32 tokens, one repeat")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="runs per path (default 3; --quick 1)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of the engine, both paths")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--stream-messages-per-s", type=float, default=DEFAULT_STREAM_MESSAGES_PER_S,
                        help="the replica's streaming chunk budget (serve_app/core.py); 0 = a message per token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = parser.parse_args()
    n = args.requests or (16 if args.quick else 64)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if not (1 <= n <= 4096 and 1 <= new_tokens <= 512 and 1 <= args.repeats <= 10):
        parser.error("requests must be in [1, 4096], new-tokens in [1, 512], repeats in [1, 10]")
    jobs = make_jobs(n, new_tokens, args.seed)

    # In-process before Ray starts and after it is gone, so no idle Ray process competes with it.
    first, ref_ids = run_in_process(args, jobs, runs=(args.repeats + 1) // 2)
    serve_rows, serve_ids = run_serve(args, jobs)
    last, _ = run_in_process(args, jobs, runs=args.repeats // 2)
    for row, ids in zip(serve_rows, serve_ids):
        if ids != ref_ids:  # same greedy work on every path, or the comparison means nothing
            raise SystemExit(f"{row.path}: outputs differ from the in-process engine's")
    runs = [*first, *serve_rows, *last]
    base = best(runs, IN_PROCESS)
    rows = [base, best(runs, SERVE_GENERATE), best(runs, SERVE_STREAM)]
    text = table(rows, base)
    ratios = {r.path: r.tokens_per_s / base.tokens_per_s for r in rows[1:]}
    verdict = "; ".join(f"{path}: {ratio:.3f}x {'PASS' if ratio >= BAR else 'FAIL'}" for path, ratio in ratios.items())
    print(f"\n{n} requests x {new_tokens} new tokens, {len({j.adapter for j in jobs})} adapters (incl. base), "
          f"all at once, greedy; torch threads {args.torch_threads}; stream messages/s {args.stream_messages_per_s:g}; "
          f"best of {args.repeats} runs per path\n")
    print(text)
    print(f"\nbar {BAR}x of in-process throughput -- {verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_serve.md").write_text(f"{text}\n\nbar {BAR}x -- {verdict}\n")
    (args.out / "bench_serve.json").write_text(json.dumps({
        "requests": n, "new_tokens": new_tokens, "torch_threads": args.torch_threads, "repeats": args.repeats,
        "stream_messages_per_s": args.stream_messages_per_s,
        "best": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows],
        "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in runs], "ratios": ratios, "bar": BAR,
    }, indent=2))


if __name__ == "__main__":
    main()
