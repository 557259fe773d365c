"""Cost vs number of adapters: the same workload over 1, 100 and 1,000 distinct adapters.

    python -m loadtests.bench_adapters              # SmolLM2-135M shape, float32 (~10 min on 2 cores)
    python -m loadtests.bench_adapters --quick      # small model, for a smoke run

256 requests (short prompts, 64 new tokens, EOS ignored) all submitted at once; each request's
adapter is drawn Zipf(alpha=1) over the N adapters (rank 8 on q_proj and v_proj, generated here).
32 device slots; the host cache holds a few hundred adapters, the rest stay on disk until asked
for. Each case gets a fresh engine whose adapters all start on disk (preload off), so cold loads,
host-cache evictions and device-slot swaps are part of what is measured. Prints a table with
tokens/s, the ratio to the 1-adapter case, host-cache and device-slot hit rates and p95 time to
first token; writes markdown, JSON and a PNG to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
from loadtests.bench_engine import QUICK_SHAPE, SMOLLM2_SHAPE
from models.synthetic import build_model


def write_adapters(root: Path, base_shape: dict, n: int, rank: int = 8) -> list[Path]:
    """n PEFT adapters (rank 8, q_proj + v_proj, non-zero B), written fast without PEFT."""
    h = base_shape["hidden_size"]
    kv = base_shape["num_kv_heads"] * (h // base_shape["num_heads"])
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in tqdm(range(n), desc=f"writing {n} adapters", leave=False):
        d = root / f"lora-{i:04d}"
        paths.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(base_shape["num_layers"]):
            for module, out in (("q_proj", h), ("v_proj", kv)):
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
            "bias": "none", "use_dora": False, "use_rslora": False, "task_type": "CAUSAL_LM"}))
    return paths


def zipf_choices(n_adapters: int, n_requests: int, seed: int) -> list[int]:
    weights = [1.0 / (k + 1) for k in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n_requests)


def run_case(base: Path, adapters: list[Path], picks: list[int], prompts: list[list[int]], new_tokens: int,
             slots: int, host_bytes: int, label: str) -> dict[str, float]:
    used = sorted(set(picks))
    engine = Engine(EngineConfig(
        model=str(base), max_lora_rank=8, max_adapter_slots=slots, host_cache_bytes=host_bytes,
        adapters=tuple(AdapterSpec(f"lora-{i}", str(adapters[i])) for i in range(len(adapters))),
        preload_adapters=False, kv_cache_bytes=2 * 1024**3, max_num_seqs=64, max_num_batched_tokens=1024,
        max_waiting=4096, max_queue_wait_s=None,  # every request arrives at once: queueing is the workload
    ))
    ttft: list[float] = []
    bar = tqdm(total=len(prompts) * new_tokens, desc=label, unit="tok", leave=False)

    async def one(prompt: list[int], adapter: str) -> int:
        start = time.perf_counter()
        got = 0
        async for out in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), adapter):
            if got == 0 and out.tokens:
                ttft.append(time.perf_counter() - start)
            got += len(out.tokens)
            bar.update(len(out.tokens))
        return got

    async def all_requests() -> int:
        counts = await asyncio.gather(*(one(p, f"lora-{i}") for p, i in zip(prompts, picks)))
        return sum(counts)

    start = time.perf_counter()
    tokens = asyncio.run(all_requests())
    elapsed = time.perf_counter() - start
    bar.close()
    stats = engine.stats().adapters
    engine.check_idle_invariants()
    engine.shutdown()
    ttft.sort()
    host_total = stats.host_hits + stats.host_misses
    device_total = stats.device_hits + stats.device_misses
    return {
        "distinct_adapters_used": len(used),
        "tokens_per_s": tokens / elapsed,
        "host_hit_rate": stats.host_hits / host_total if host_total else 1.0,
        "device_hit_rate": stats.device_hits / device_total if device_total else 1.0,
        "source_loads": stats.source_loads,
        "device_evictions": stats.device_evictions,
        "host_evictions": stats["host_evictions"],
        "p95_ttft_s": ttft[int(0.95 * (len(ttft) - 1))],
        "p50_ttft_s": ttft[len(ttft) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results"))
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else SMOLLM2_SHAPE
    counts = [1, 10, 100] if args.quick else [1, 100, 1000]
    n_requests, new_tokens = (48, 16) if args.quick else (256, 64)
    slots = 8 if args.quick else 32
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    base = work / "base"
    if not (base / "config.json").exists():
        build_model(base, "llama", seed=0, **shape)
    adapters = write_adapters(work / "adapters", shape, max(counts))
    one_adapter_bytes = (adapters[0] / "adapter_model.safetensors").stat().st_size
    host_bytes = (32 if args.quick else 256) * one_adapter_bytes
    rng = random.Random(3)
    prompts = [[rng.randrange(8, 400) for _ in range(rng.randint(16, 48))] for _ in range(n_requests)]

    results: dict[int, dict[str, float]] = {}
    for n in counts:
        results[n] = run_case(base, adapters[:n], zipf_choices(n, n_requests, seed=n), prompts, new_tokens,
                              slots, host_bytes, f"{n} adapters")
        gc.collect()
    base_tps = results[1]["tokens_per_s"]
    lines = [
        f"Model: random-init Llama {shape}, float32, {torch.get_num_threads()} threads. {n_requests} requests, "
        f"prompts 16-48 tokens, {new_tokens} new tokens, Zipf(1) over N adapters (rank 8, q/v), {slots} device "
        f"slots, host cache {host_bytes / 2**20:.0f} MiB (~{host_bytes // one_adapter_bytes} adapters).",
        "",
        "| adapters | used | tokens/s | vs 1 adapter | host hit rate | device hit rate | loads from disk | p50 / p95 TTFT (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, r in results.items():
        lines.append(
            f"| {n} | {r['distinct_adapters_used']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base_tps:.2f}x | "
            f"{r['host_hit_rate']:.1%} | {r['device_hit_rate']:.1%} | {r['source_loads']} | "
            f"{r['p50_ttft_s']:.2f} / {r['p95_ttft_s']:.2f} |"
        )
    last = counts[-1]
    lines += ["", f"- {last} adapters / 1 adapter: **{results[last]['tokens_per_s'] / base_tps:.2f}x** (bar >= 0.70x)"]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_adapters_quick" if args.quick else "bench_adapters"
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    plot(results, args.out / f"{stem}.png")


def plot(results: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar([str(n) for n in ns], [results[n]["tokens_per_s"] for n in ns], color="#4c72b0")
    a.set_xlabel("distinct adapters (Zipf 1)")
    a.set_ylabel("generated tokens / s")
    a.set_title("Throughput")
    b.plot([str(n) for n in ns], [results[n]["host_hit_rate"] for n in ns], "o-", label="host cache hit rate")
    b.plot([str(n) for n in ns], [results[n]["device_hit_rate"] for n in ns], "s-", label="device slot hit rate")
    b.set_ylim(0, 1.05)
    b.set_xlabel("distinct adapters")
    b.legend(fontsize=8)
    b.set_title("Hit rates")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
