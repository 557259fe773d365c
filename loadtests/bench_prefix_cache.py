"""Prefix caching: 64 requests over 8 adapters sharing a 1,000-token system prompt, cache on vs off.

    python -m loadtests.bench_prefix_cache            # synthetic Llama (8 layers, hidden 256), a few minutes
    python -m loadtests.bench_prefix_cache --quick    # the demo-size shape, 16 requests: a smoke run

Each request is the same 1,000-token system prompt followed by its own 24-token question; its
adapter is one of 8 (rank 8 on q/k/v/o: every adapter changes the K/V, so nothing may be shared
between them; 8 requests each, interleaved). All requests are submitted at once to an in-process
engine (float32, greedy, EOS ignored), first with prefix caching off, then on, each on a fresh
engine over the same weights in the same process. Measured per case: time to first token (p50,
p95), generated tokens/s over the whole run, and the cache's hit rate (prompt tokens whose K/V
were reused). With the cache, only the first request of each adapter that is admitted computes the
system prompt; requests admitted while it is still being computed compute it too (blocks are
registered once computed). The outputs of the two cases are compared token by token.
Writes markdown, JSON and a PNG to --out (loadtests/results/prefix_cache/).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
from models.synthetic import build_adapter, build_model

FULL_SHAPE = dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=768,
                  vocab_size=4096, max_position_embeddings=2048)
QUICK_SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                   vocab_size=4096, max_position_embeddings=2048)
N_ADAPTERS = 8
SYSTEM_TOKENS = 1000
QUESTION_TOKENS = 24


def build(work: Path, shape: dict[str, int]) -> tuple[Path, list[Path]]:
    base = work / "base"
    if not (base / "config.json").exists():
        build_model(base, "llama", seed=7, init_std=0.05, **shape)
    adapters = []
    for i in range(N_ADAPTERS):
        path = work / f"lora-{i}"
        if not (path / "adapter_config.json").exists():
            build_adapter(path, base, rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                          seed=500 + i, std=0.05)
        adapters.append(path)
    return base, adapters


def workload(n_requests: int, vocab: int) -> list[tuple[list[int], str]]:
    rng = random.Random(16)
    system = [rng.randrange(8, vocab) for _ in range(SYSTEM_TOKENS)]
    return [
        (system + [rng.randrange(8, vocab) for _ in range(QUESTION_TOKENS)], f"lora-{i % N_ADAPTERS}")
        for i in range(n_requests)
    ]


def run_case(base: Path, adapters: list[Path], requests: list[tuple[list[int], str]], new_tokens: int,
             caching: bool) -> dict[str, object]:
    engine = Engine(EngineConfig(
        model=str(base), adapters=tuple(AdapterSpec(f"lora-{i}", str(p)) for i, p in enumerate(adapters)),
        max_lora_rank=8, max_adapter_slots=N_ADAPTERS, enable_prefix_caching=caching,
        num_kv_blocks=len(requests) * -(-(SYSTEM_TOKENS + QUESTION_TOKENS + new_tokens) // 16) + 64,
        max_num_seqs=64, max_num_batched_tokens=512, max_waiting=4096, max_queue_wait_s=None,
    ))
    ttft: list[float] = []
    outputs: list[list[int]] = [[] for _ in requests]
    bar = tqdm(total=len(requests) * new_tokens, desc=f"cache {'on' if caching else 'off'}", unit="tok", leave=False)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def one(i: int, prompt: list[int], adapter: str) -> None:
        start = time.perf_counter()
        async for out in engine.generate(prompt, params, adapter):
            if not outputs[i] and out.tokens:
                ttft.append(time.perf_counter() - start)
            outputs[i].extend(t.id for t in out.tokens)  # out.token_ids of the last output repeats them all
            bar.update(len(out.tokens))

    async def everything() -> None:
        await asyncio.gather(*(one(i, p, a) for i, (p, a) in enumerate(requests)))

    try:
        start = time.perf_counter()
        asyncio.run(everything())
        elapsed = time.perf_counter() - start
        bar.close()
        stats = engine.stats()
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
    ttft.sort()
    return {
        "caching": caching,
        "elapsed_s": elapsed,
        "tokens_per_s": sum(len(o) for o in outputs) / elapsed,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "hit_rate": stats.prefix_cache["hit_rate"],
        "prefill_tokens_computed": stats.prefill_tokens,
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results/prefix_cache"))
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    n_requests, new_tokens = (16, 4) if args.quick else (64, 32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prefix-cache-"))
    base, adapters = build(work, shape)
    requests = workload(n_requests, shape["vocab_size"])
    results = {}
    for caching in (False, True):
        results["on" if caching else "off"] = run_case(base, adapters, requests, new_tokens, caching)
        gc.collect()
    off, on = results["off"], results["on"]
    identical = on.pop("outputs") == off.pop("outputs")
    lines = [
        f"Model: random-init Llama {shape}, float32, {torch.get_num_threads()} threads. {n_requests} requests "
        f"submitted at once, {N_ADAPTERS} adapters (rank 8, q/k/v/o; interleaved), each prompt a shared "
        f"{SYSTEM_TOKENS}-token system prompt + its own {QUESTION_TOKENS}-token question, {new_tokens} new tokens, "
        f"greedy; max_num_batched_tokens 512, max_num_seqs 64. Same process, fresh engine per case.",
        "",
        "| prefix cache | TTFT p50 (s) | TTFT p95 (s) | tokens/s | wall (s) | prompt tokens computed | hit rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{r['elapsed_s']:.1f} | {r['prefill_tokens_computed']} | {r['hit_rate']:.1%} |"
        )
    ratios = {
        "ttft_p50": off["ttft_p50_s"] / on["ttft_p50_s"],
        "ttft_p95": off["ttft_p95_s"] / on["ttft_p95_s"],
        "throughput": on["tokens_per_s"] / off["tokens_per_s"],
    }
    lines += [
        "",
        f"- cache on vs off: TTFT p50 **{ratios['ttft_p50']:.2f}x** lower, p95 **{ratios['ttft_p95']:.2f}x** lower, "
        f"throughput **{ratios['throughput']:.2f}x**",
        f"- outputs token-identical with the cache on and off: **{'yes' if identical else 'NO'}**",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "results_quick" if args.quick else "results"
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({**results, "ratios": ratios, "identical": identical}, indent=2))
    plot(results, args.out / f"{stem}.png")


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.38
    xs = range(len(names))
    a.bar([x - width / 2 for x in xs], [results[n]["ttft_p50_s"] for n in names], width, label="p50", color="#4c72b0")
    a.bar([x + width / 2 for x in xs], [results[n]["ttft_p95_s"] for n in names], width, label="p95", color="#dd8452")
    a.set_xticks(list(xs), [f"cache {n}" for n in names])
    a.set_ylabel("time to first token (s)")
    a.set_title("TTFT")
    a.legend(fontsize=8)
    b.bar([f"cache {n}" for n in names], [results[n]["tokens_per_s"] for n in names], color="#55a868")
    b.set_ylabel("generated tokens / s")
    b.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
