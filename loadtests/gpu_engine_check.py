"""Engine sections of the one-shot GPU check (called by loadtests/gpu_check.py).

engine_fidelity    tiny random Llama + 4 adapters, float32 greedy on CUDA: engine (Triton LoRA path)
                   vs transformers + PEFT on CUDA, token for token, mixed batch.
engine_throughput  Mistral-7B-shaped random-init model in bfloat16 (dummy weights made on the GPU):
                   128 requests, prompts ~450 tokens, outputs ~234 tokens, base only vs 30 rank-16
                   adapters mixed (bar >= 0.90x), and the GPU memory the 30 adapters take.

Needs only torch, triton, transformers, peft, safetensors, huggingface_hub (no ray).
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
THROUGHPUT_BAR = 0.90


def _section(report: dict[str, Any], name: str, fn: Any) -> None:
    started = time.perf_counter()
    section: dict[str, Any] = {}
    report["sections"][name] = section
    try:
        fn(section, report["meta"])
    except Exception as exc:
        section["status"] = f"error: {type(exc).__name__}: {exc}"
        section["traceback"] = traceback.format_exc(limit=12)
    section["seconds"] = round(time.perf_counter() - started, 2)


def run_engine_sections(report: dict[str, Any]) -> None:
    _section(report, "engine_fidelity", _fidelity)
    _section(report, "engine_throughput", _throughput)


def _fidelity(section: dict[str, Any], meta: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
    from engine.synthetic import build_adapter, build_model

    device = "cuda" if meta["cuda"] else "cpu"
    root = Path(tempfile.mkdtemp(prefix="gpu-fidelity-"))
    base = build_model(root / "base", "llama", seed=1, init_std=0.08)
    recipes = {"qv-r4": (4, ("q_proj", "v_proj")), "attn-r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
               "all-r64": (64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
               "mlp-r8": (8, ("gate_proj", "up_proj", "down_proj"))}
    adapters = {name: build_adapter(root / name, base, rank=r, targets=t, seed=i, std=0.05)
                for i, (name, (r, t)) in enumerate(recipes.items())}
    engine = Engine(EngineConfig(model=str(base), adapters=tuple(AdapterSpec(k, str(v)) for k, v in adapters.items()),
                                 device=device, max_lora_rank=64, max_adapter_slots=8, num_kv_blocks=256,
                                 lora_backend="triton" if meta["cuda"] else "auto"))
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serving", "many", "adapters", "batch", "cache"]
    names: list[str | None] = [None, *adapters]
    requests = [(" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))), names[i % len(names)]) for i in range(20)]

    async def go() -> list[list[int]]:
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        outs = await asyncio.gather(*(engine.complete(p, params, a) for p, a in requests))
        return [list(o.token_ids) for o in outs]

    got = asyncio.run(go())
    engine.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device)
    hf.generation_config.eos_token_id = None
    peft = PeftModel.from_pretrained(hf, str(adapters["qv-r4"]), adapter_name="qv-r4")
    for name in list(adapters)[1:]:
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    peft.eval()
    tok = engine.tokenizer
    mismatches = []
    with torch.inference_mode():
        for (prompt, adapter), tokens in zip(requests, got):
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            if adapter is None:
                with peft.disable_adapter():
                    ref = peft.generate(input_ids=ids, **kwargs)
            else:
                peft.set_adapter(adapter)
                ref = peft.generate(input_ids=ids, **kwargs)
            if ref[0, ids.shape[1]:].tolist() != tokens:
                mismatches.append({"adapter": adapter, "prompt": prompt})
    section["requests"] = len(requests)
    section["mismatches"] = len(mismatches)
    section["first_mismatches"] = mismatches[:3]
    section["status"] = "pass" if not mismatches else f"fail: {len(mismatches)}/{len(requests)} requests differ from PEFT"


def _throughput(section: dict[str, Any], meta: dict[str, Any]) -> None:
    from transformers import MistralConfig

    from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
    from engine.synthetic import build_adapter, build_tokenizer

    if not meta["cuda"] and not meta["quick"]:
        section["status"] = "skipped: no CUDA"
        return
    quick = meta["quick"] or not meta["cuda"]
    shape = dict(MISTRAL_7B)
    n_req, prompt_len, out_len, n_adapters = 128, 450, 234, 30
    if quick:
        shape.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
        n_req, prompt_len, out_len, n_adapters = 8, 24, 8, 4
    remaining = meta["deadline_unix"] - time.time()
    if meta["cuda"] and remaining < 150:
        n_req, out_len = 64, 128  # keep inside the script's budget; reported below
    section["workload"] = dict(requests=n_req, prompt_tokens=prompt_len, output_tokens=out_len, adapters=n_adapters)
    device = "cuda" if meta["cuda"] else "cpu"
    dtype = "bfloat16" if meta["cuda"] else "float32"
    root = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    base = root / "base"
    build_tokenizer(base, vocab_size=400)
    cfg = MistralConfig(**shape, bos_token_id=1, eos_token_id=2)
    cfg.save_pretrained(str(base))
    (base / "model.safetensors").write_bytes(b"")  # weights come from load_format="dummy"
    adapters = {f"a{i}": build_adapter(root / f"a{i}", base, rank=16, alpha=32,
                                       targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=i, std=0.01)
                for i in range(n_adapters)}
    engine = Engine(EngineConfig(
        model=str(base), load_format="dummy", dtype=dtype, device=device,
        adapters=tuple(AdapterSpec(k, str(v)) for k, v in adapters.items()),
        max_lora_rank=16, max_adapter_slots=n_adapters, max_num_seqs=n_req, max_num_batched_tokens=8192,
        kv_cache_bytes=(40 if meta["cuda"] else 1) * 1024**3, max_model_len=prompt_len + out_len + 8,
    ))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(prompt_len)] for _ in range(n_req)]
    mixed = [f"a{i % n_adapters}" for i in range(n_req)]
    rng.shuffle(mixed)

    def run(adapters_for: list[str | None]) -> float:
        async def go() -> int:
            params = SamplingParams(max_new_tokens=out_len, ignore_eos=True)
            outs = await asyncio.gather(*(engine.complete(p, params, a) for p, a in zip(prompts, adapters_for)))
            return sum(o.generated_tokens for o in outs)

        if meta["cuda"]:
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = asyncio.run(go())
        if meta["cuda"]:
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    run([None] * min(4, n_req))  # warm-up: Triton compiles, allocator settles
    base_tps = run([None] * n_req)
    mixed_tps = run(list(mixed))
    slot_bytes = engine.pool.slots.nbytes
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    if engine.model.lm_head_weight is not None:
        weights += engine.model.lm_head_weight.numel() * engine.model.lm_head_weight.element_size()
    kv_bytes = engine.kv.k.nbytes + engine.kv.v.nbytes
    total = torch.cuda.memory_allocated() if meta["cuda"] else weights + kv_bytes + slot_bytes
    engine.shutdown()
    ratio = mixed_tps / base_tps
    section.update(
        base_tokens_per_s=round(base_tps, 1), mixed_tokens_per_s=round(mixed_tps, 1), ratio=round(ratio, 3),
        adapter_bytes=slot_bytes, weight_bytes=weights, kv_cache_bytes=kv_bytes, total_allocated_bytes=total,
        adapter_share_of_total=round(slot_bytes / total, 4), adapter_share_of_weights=round(slot_bytes / weights, 4),
    )
    verdict = "pass" if ratio >= THROUGHPUT_BAR else "fail"
    section["status"] = f"{verdict}: {n_adapters} adapters mixed / base = {ratio:.2f}x (bar {THROUGHPUT_BAR}x)"
    if quick:
        section["status"] = "pass: quick shape (not a measurement): " + json.dumps(section["ratio"])
