"""Engine throughput benchmark: base only vs 1 adapter vs 32 mixed adapters vs PEFT's mixed generate.

    python -m loadtests.bench_engine            # the full run (SmolLM2-135M shape, float32, ~10 min on 2 cores)
    python -m loadtests.bench_engine --quick    # a small model and workload, for a smoke run
    python -m loadtests.bench_engine --no-peft --no-stress --profile --repeat 2
                                                # where the time goes: self time per op, cases side by side

Model: random-init Llama with SmolLM2-135M's shape. Workload: 64 requests, prompt lengths uniform
32-256, output lengths uniform 16-256 (EOS ignored), all arriving at once. Every case runs in this
one process, one after another, so the ratios compare like with like; an untimed warm-up first runs
the workload once with every adapter (see `warm_up`), so no timed case pays for adapter loads or for
oneDNN's first use of a row count. Writes a markdown table, a JSON file and a PNG bar chart to --out.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams, openmp_env
from loadtests.op_profile import OpProfile, profiled, side_by_side
from models.synthetic import build_adapter, build_model

SMOLLM2_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
QUICK_SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                   vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=1024)
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def total_output(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(8, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def run_engine_case(engine: Engine, work: Workload, adapters: list[str | None], label: str) -> float:
    """Generated tokens per second with every request submitted at once."""

    async def go() -> int:
        bar = tqdm(total=work.total_output, desc=label, unit="tok", leave=False)

        async def one(prompt: list[int], n: int, adapter: str | None) -> int:
            got = 0
            async for out in engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter):
                got += len(out.tokens)
                bar.update(len(out.tokens))
            return got

        counts = await asyncio.gather(*(one(p, n, a) for p, n, a in zip(work.prompts, work.output_lens, adapters)))
        bar.close()
        return sum(counts)

    start = time.perf_counter()
    tokens = asyncio.run(go())
    elapsed = time.perf_counter() - start
    assert tokens == work.total_output, (tokens, work.total_output)
    engine.check_idle_invariants()
    return tokens / elapsed


def warm_up(engine: Engine, adapter_ids: list[str], work: Workload | None = None) -> None:
    """Untimed: a short batch with every adapter once (and base requests), then `work` itself when given.

    Each adapter's first slot fill happens here, not in a timed case: bench_peers warms both engines
    the same way, and PEFT's adapters are loaded before its timer starts, so no timed case pays a load.
    Running `work` once more matters as much: oneDNN builds a kernel for every new row count of every
    weight shape (about 0.4 ms each here), so without it the first timed case (base only) paid for
    the hundreds of row counts the workload's steps have, and every later case found them built.
    """
    ids: list[str | None] = [None] * 4 + list(adapter_ids)
    run_engine_case(engine, make_workload(len(ids), (8, 16), (4, 8), 400, seed=9), ids, "warm-up")
    if work is not None:
        adapters = [adapter_ids[i % len(adapter_ids)] for i in range(len(work.prompts))]
        run_engine_case(engine, work, list(adapters), "warm-up: the workload")


def run_peft_case(base_dir: Path, adapter_dirs: dict[str, Path], work: Workload, adapters: list[str], batch: int) -> float:
    """PEFT's mixed-adapter generate (adapter_names=...), left-padded static batches, EOS ignored."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in tqdm(names[1:], desc="peft: load adapters", leave=False):
        peft.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    peft.eval()
    pad = 0
    start = time.perf_counter()
    bar = tqdm(total=len(work.prompts), desc="peft generate", unit="req", leave=False)
    with torch.inference_mode():
        for lo in range(0, len(work.prompts), batch):
            prompts = work.prompts[lo : lo + batch]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            peft.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(work.output_lens[lo : lo + batch]),
                do_sample=False, adapter_names=adapters[lo : lo + batch], pad_token_id=pad,
            )
            bar.update(len(prompts))
    bar.close()
    elapsed = time.perf_counter() - start
    # Only the tokens each request asked for count: a static batch runs to its longest request.
    return work.total_output / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and workload (smoke run)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-stress", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("loadtests/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="where the random model is written (default: temp dir)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the base / 1 adapter / mixed cases, interleaved; each case reports its median")
    ap.add_argument("--profile", action="store_true",
                    help="time every torch op over each engine case and print the cases side by side "
                         "(loadtests/op_profile.py); the profiler's overhead lowers every case's tokens/s")
    args = ap.parse_args()
    openmp_env.reexec_with_defaults("loadtests.bench_engine")  # before the engine's first OpenMP region (engine/openmp_env.py)
    torch.manual_seed(0)

    shape = QUICK_SHAPE if args.quick else SMOLLM2_SHAPE
    n = args.requests or (16 if args.quick else 64)
    prompt_range, output_range = ((8, 48), (4, 32)) if args.quick else ((32, 256), (16, 256))
    n_adapters = 8 if args.quick else 32
    work_dir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base = work_dir / "base"
    if not (base / "config.json").exists():
        print(f"building random-init model {shape} in {base}")
        build_model(base, "llama", seed=0, **shape)
    qv = {f"qv-{i}": build_adapter(work_dir / f"qv-{i}", base, rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=i)
          for i in tqdm(range(n_adapters), desc="adapters (r8 q,v)", leave=False)}
    work = make_workload(n, prompt_range, output_range, vocab=min(shape["vocab_size"], 400), seed=1)
    rng = random.Random(2)
    mixed = [f"qv-{i % n_adapters}" for i in range(n)]
    rng.shuffle(mixed)

    results: dict[str, float] = {}
    rounds: dict[str, list[float]] = {}  # every round's tokens/s per case (--repeat)
    profiles: dict[str, OpProfile] = {}

    def timed(key: str, case: Callable[[], float]) -> None:
        if args.profile:
            tps, prof = profiled(case)
            label = key.removeprefix("engine: ")
            profiles[label] = prof if label not in profiles else profiles[label].plus(prof)
        else:
            tps = case()
        rounds.setdefault(key, []).append(tps)
        results[key] = statistics.median(rounds[key])

    cfg = dict(model=str(base), dtype="float32", max_lora_rank=8, max_adapter_slots=n_adapters,
               kv_cache_bytes=3 * 1024**3, max_num_seqs=n, max_num_batched_tokens=args.max_num_batched_tokens,
               max_queue_wait_s=None,  # every request arrives at once: queueing is the workload
               # Rounds and cases repeat the same prompts: a cache hit would time the cache, not the engine.
               enable_prefix_caching=False)
    engine = Engine(EngineConfig(adapters=tuple(AdapterSpec(k, str(v)) for k, v in qv.items()), **cfg))
    warm_up(engine, list(qv), work)
    # Rounds interleave the cases, so a burst of load from elsewhere on the machine hits all of them.
    for _ in range(args.repeat):
        timed("engine: base only", lambda: run_engine_case(engine, work, [None] * n, "base only"))
        timed("engine: 1 adapter", lambda: run_engine_case(engine, work, ["qv-0"] * n, "1 adapter"))
        timed(f"engine: {n_adapters} adapters mixed",
              lambda: run_engine_case(engine, work, list(mixed), f"{n_adapters} mixed"))
    engine.shutdown()
    del engine
    gc.collect()

    stress_bound = None
    if not args.no_stress:
        full = {f"all-{i}": build_adapter(work_dir / f"all-{i}", base, rank=16, alpha=32, targets=ALL_PROJ, seed=1000 + i)
                for i in tqdm(range(n_adapters), desc="adapters (r16 all)", leave=False)}
        stress_cfg = {**cfg, "max_lora_rank": 16}
        engine = Engine(EngineConfig(adapters=tuple(AdapterSpec(k, str(v)) for k, v in full.items()), **stress_cfg))
        names = [f"all-{i % n_adapters}" for i in range(n)]
        rng.shuffle(names)
        warm_up(engine, list(full))
        timed(f"engine: {n_adapters} adapters r16 all-proj (stress)",
              lambda: run_engine_case(engine, work, names, "stress"))
        base_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        adapter_bytes = sum(r.adapter.nbytes for r in engine.pool.records.values())
        # Decode is memory-bound: a step that touches every adapter reads the base plus all adapters.
        stress_bound = base_bytes / (base_bytes + adapter_bytes)
        engine.shutdown()
        del engine
        gc.collect()

    if not args.no_peft:
        results[f"peft: {n_adapters} adapters mixed generate"] = run_peft_case(base, qv, work, list(mixed), batch=64)

    base_tps = results["engine: base only"]
    mixed_key = f"engine: {n_adapters} adapters mixed"
    rows = [(k, v, v / base_tps) for k, v in results.items()]
    lines = [
        f"Model: random-init Llama {shape}, float32, {torch.get_num_threads()} threads; "
        f"{n} requests, prompts {prompt_range}, outputs {output_range} (EOS ignored), all at once.",
        "",
        "| case | generated tokens/s | vs base only |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v:.1f} | {r:.2f}x |" for k, v, r in rows],
        "",
        f"- {n_adapters} mixed adapters / base only: **{results[mixed_key] / base_tps:.2f}x** (bar >= 0.95x)",
    ]
    peft_key = f"peft: {n_adapters} adapters mixed generate"
    if peft_key in results:
        lines.append(f"- engine ({n_adapters} mixed) / PEFT mixed generate: **{results[mixed_key] / results[peft_key]:.2f}x** (bar >= 3x)")
    if stress_bound is not None:
        stress_key = f"engine: {n_adapters} adapters r16 all-proj (stress)"
        lines.append(
            f"- stress / base only: {results[stress_key] / base_tps:.2f}x; memory-bound ceiling "
            f"base bytes / (base + all adapter bytes) = {stress_bound:.2f}x"
        )
    if args.repeat > 1:
        lines += ["", f"Medians of {args.repeat} interleaved rounds; every round (tokens/s):",
                  *[f"- {k}: {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in rounds.items() if len(vs) > 1],
                  "- mixed / base per round: " + ", ".join(
                      f"{m / b:.2f}" for b, m in zip(rounds["engine: base only"], rounds[mixed_key]))]
    if profiles:
        lines += ["", "Self time per op over each whole case (--profile; seconds, share of the case's wall time, "
                  "calls):", "", side_by_side(profiles)]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("bench_engine_quick" if args.quick else "bench_engine") + ("_profile" if args.profile else "")
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"results": results, "stress_bound": stress_bound, "shape": shape,
                                                       "requests": n, "rounds": rounds}, indent=2))
    plot(rows, args.out / f"{stem}.png")


def plot(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
    labels = [k for k, _, _ in rows]
    values = [v for _, v, _ in rows]
    bars = ax.barh(labels, values, color=["#4c72b0" if k.startswith("engine") else "#c44e52" for k in labels])
    for bar, (_, v, r) in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.0f} tok/s ({r:.2f}x)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s (higher is better)")
    ax.set_title("Engine throughput, same workload, one process")
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
