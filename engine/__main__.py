"""Generate from the command line, several adapters in one batch.

    python -m engine --model DIR --adapter a=DIR_A --adapter b=DIR_B --prompt "Hello" --max-new-tokens 32
    python -m models.demo                               # the same on the bundled demo model and its adapters

Every (prompt, adapter) pair is submitted at once, so they are decoded together in mixed batches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="model directory or Hub id (the bundled demo model: python -m models.demo)")
    ap.add_argument("--adapter", action="append", default=[], help="id=path (repeatable); also LORA_ADAPTERS=id=path,...")
    ap.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    specs = [AdapterSpec.parse(a) for a in args.adapter]
    specs += list(AdapterSpec.parse_list(os.environ.get("LORA_ADAPTERS", "")))
    prompts = args.prompt or ["The quick brown fox", "Serving many adapters"]
    engine = Engine(EngineConfig(model=args.model, adapters=tuple(specs), dtype=args.dtype, device=args.device))
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
              f"largest batch: {stats.max_batch_seqs} sequences from {len(targets)} adapters/base")

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
