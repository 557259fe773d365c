"""Shared by the showcase scripts and tests/test_smollm2.py: paths, chat formatting, batched generation."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ADAPTERS_DIR = HERE / "adapters"
DATA_DIR = HERE / "data"
BASE_ANSWERS = DATA_DIR / "base_answers.jsonl"
# Enough for every trained format (ALL CAPS text takes about twice the tokens of the same text in
# lower case); the base model's answers are cut at the same budget when its rate is measured.
MAX_NEW_TOKENS = 96

if str(REPO) not in sys.path:  # the scripts run as `python models/smollm2/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def chat_text(tokenizer: Any, question: str) -> str:
    """The ChatML prompt a chat client would send: the model's default system prompt + one user turn."""
    return str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True))


def adapter_dirs() -> dict[str, Path]:
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}


def make_engine(model_dir: Path, adapters: dict[str, Path] | None = None, **overrides: Any) -> Any:
    from engine import AdapterSpec, Engine, EngineConfig

    cfg: dict[str, Any] = dict(
        model=str(model_dir),
        adapters=tuple(AdapterSpec(name, str(path)) for name, path in (adapters or {}).items()),
        max_lora_rank=16, max_adapter_slots=8, dtype="float32",
        max_num_seqs=64, max_num_batched_tokens=1024, num_kv_blocks=1024, block_size=16,
        max_queue_wait_s=None,  # evaluations submit every question at once: no queue deadline
    )
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg))


def generate_all(
    engine: Any,
    questions: Sequence[str],
    adapters: Sequence[str | None],
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
) -> list[str]:
    """Greedy answers for (question, adapter) pairs, all in flight together (the engine batches them)."""
    from engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    prompts = [chat_text(engine.tokenizer, q) for q in questions]

    async def run() -> list[str]:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")

        async def one(prompt: str, adapter: str | None) -> str:
            out = await engine.complete(prompt, params, adapter)
            if bar is not None:
                bar.update(1)
            return str(out.generated_text)

        try:
            return list(await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters, strict=True))))
        finally:
            if bar is not None:
                bar.close()

    return asyncio.run(run())
