"""Generate from the command line, several adapters in one batch.

    python -m engine                                   # demo: a small model and two adapters built locally
    python -m engine --model DIR --adapter a=DIR_A --adapter b=DIR_B --prompt "Hello" --max-new-tokens 32

Every (prompt, adapter) pair is submitted at once, so they are decoded together in mixed batches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams


def demo_dir() -> Path:
    from engine.gguf_convert import cache_root

    root = cache_root() / "engine-demo"
    if not (root / "base" / "config.json").exists():
        from engine.synthetic import build_adapter, build_model

        print(f"building a small random-init demo model and two adapters in {root} ...")
        build_model(root / "base", "llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=256, seed=0, init_std=0.08)
        build_adapter(root / "adapter-a", root / "base", rank=8, targets=("q_proj", "v_proj"), seed=1, std=0.2)
        build_adapter(root / "adapter-b", root / "base", rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      seed=2, std=0.2)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or Hub id (default: a locally built demo model)")
    ap.add_argument("--adapter", action="append", default=[], help="id=path (repeatable); also LORA_ADAPTERS=id=path,...")
    ap.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    specs = [AdapterSpec.parse(a) for a in args.adapter]
    specs += list(AdapterSpec.parse_list(os.environ.get("LORA_ADAPTERS", "")))
    model = args.model
    if model is None:
        root = demo_dir()
        model = str(root / "base")
        specs = specs or [AdapterSpec("adapter-a", str(root / "adapter-a")), AdapterSpec("adapter-b", str(root / "adapter-b"))]
    prompts = args.prompt or ["The quick brown fox", "Serving many adapters"]
    engine = Engine(EngineConfig(model=model, adapters=tuple(specs), dtype=args.dtype, device=args.device))
    targets: list[str | None] = [None, *(s.adapter_id for s in specs)]
    jobs = [(p, a) for p in prompts for a in targets]

    async def run() -> None:
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        start = time.perf_counter()
        outs = await asyncio.gather(*(engine.complete(p, params, a) for p, a in jobs))
        elapsed = time.perf_counter() - start
        for (prompt, adapter), out in zip(jobs, outs):
            print(f"[{adapter or 'base'}] {prompt!r} -> {out.generated_text!r} ({out.finish_reason})")
        stats = engine.stats()
        print(f"{len(jobs)} requests, {sum(o.generated_tokens for o in outs)} tokens in {elapsed:.2f}s; "
              f"largest batch: {stats['max_batch_seqs']} sequences from {len(targets)} adapters/base")

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
