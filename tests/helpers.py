"""Shared test helpers: tiny models on disk and the transformers + PEFT oracle."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
from models.synthetic import build_adapter, build_model

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serving", "many", "adapters", "batch", "cache", "block", "token", "model", "paged", "attention", "decode", "prefill", "queue", "ray", "serve", "base", "rank", "alpha", "scale"]

# Four adapters with non-zero B: ranks 4..64, different target sets, one rslora, one with alpha_pattern.
ADAPTER_RECIPES: dict[str, dict[str, Any]] = {
    "qv-r4": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
    "attn-r16-rslora": dict(rank=16, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    "all-r64": dict(rank=64, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), std=0.02),
    "mlp-r8-pattern": dict(
        rank=8, alpha=16.0, targets=("gate_proj", "up_proj", "down_proj"),
        extra_config={"alpha_pattern": {"down_proj": 4.0}},
    ),
}

FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
    ),
    "mistral": dict(),
    "qwen2": dict(tie_word_embeddings=True),
}


@dataclass
class TinyFamily:
    family: str
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)

    def specs(self) -> tuple[AdapterSpec, ...]:
        return tuple(AdapterSpec(name, str(path)) for name, path in self.adapters.items())


def build_family(root: Path, family: str) -> TinyFamily:
    base = build_model(root / family / "base", family, seed=1, init_std=0.08, **FAMILY_OPTIONS[family])
    fam = TinyFamily(family, base)
    for i, (name, recipe) in enumerate(ADAPTER_RECIPES.items()):
        recipe = dict(recipe)
        std = recipe.pop("std", 0.08)
        fam.adapters[name] = build_adapter(root / family / name, base, seed=100 + i, std=std, **recipe)
    return fam


def make_engine(fam: TinyFamily, **overrides: Any) -> Engine:
    cfg = dict(model=str(fam.base), adapters=fam.specs(), max_adapter_slots=8, max_lora_rank=64,
               num_kv_blocks=256, block_size=16, max_num_batched_tokens=128, max_num_seqs=32)
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg))


def random_prompts(n: int, seed: int, min_words: int = 2, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


class PeftOracle:
    """transformers + PEFT on the same weights: greedy reference tokens, one request at a time."""

    def __init__(self, fam: TinyFamily, device: str = "cpu") -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(fam.base))
        base = AutoModelForCausalLM.from_pretrained(str(fam.base), dtype=torch.float32).to(device)
        # Never stop at EOS: the engine side runs with ignore_eos (min_new_tokens would instead
        # forbid EOS and change the argmax).
        base.generation_config.eos_token_id = None
        names = list(fam.adapters)
        self.model = PeftModel.from_pretrained(base, str(fam.adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(fam.adapters[name]), adapter_name=name)
        self.model.eval()
        self._cache: dict[tuple[str | None, str, int], list[int]] = {}

    @torch.inference_mode()
    def greedy(self, prompt: str, adapter: str | None, max_new_tokens: int) -> list[int]:
        key = (adapter, prompt, max_new_tokens)
        if key not in self._cache:
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            ids = enc.input_ids
            # An explicit mask: without it transformers masks every pad-token id in the prompt, and
            # some tokenizers (SmolLM2: <|im_end|>) use a token that real prompts contain as pad.
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                          attention_mask=enc.attention_mask)
            if adapter is None:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, **kwargs)
            else:
                self.model.set_adapter(adapter)
                out = self.model.generate(input_ids=ids, **kwargs)
            self._cache[key] = out[0, ids.shape[1]:].tolist()
        return self._cache[key]


async def run_requests(
    engine: Engine,
    requests: Sequence[tuple[str, str | None]],
    max_new_tokens: int,
    stagger_s: float = 0.0,
) -> list[list[int]]:
    """Greedy, EOS ignored, all requests in flight together (optionally arriving one after another)."""

    async def one(i: int, prompt: str, adapter: str | None) -> list[int]:
        if stagger_s:
            await asyncio.sleep(i * stagger_s)
        out = await engine.complete(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True), adapter)
        return list(out.token_ids)

    return list(await asyncio.gather(*(one(i, p, a) for i, (p, a) in enumerate(requests))))
