"""The engine with the Triton paged attention forced (CPU: Triton's interpreter) matches PEFT token for token.

Kept small (tiny models, few tokens): every kernel launch is interpreted on the CPU.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import PeftOracle, TinyFamily, make_engine, random_prompts, run_requests

pytest.importorskip("triton")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_triton_attention_matches_peft_in_mixed_batches(family: str, families: dict[str, TinyFamily]) -> None:
    """Prefill chunks after a cached prefix (small token budget), decodes beside them, every adapter."""
    fam = families[family]
    oracle = PeftOracle(fam)
    engine = make_engine(fam, attention_backend="triton", lora_backend="triton", max_num_batched_tokens=24)
    try:
        assert engine.runner.attention_backend == "triton"
        names: list[str | None] = [None, *fam.adapters]
        requests = [(p, names[i % len(names)]) for i, p in enumerate(random_prompts(5, 31, 3, 20))]
        got = asyncio.run(run_requests(engine, requests, 4, stagger_s=0.01))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, 4), f"{family}/{adapter}: {prompt!r}"
        assert engine.stats().max_batch_seqs > 1
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_triton_attention_after_preemption_matches_peft(families: dict[str, TinyFamily]) -> None:
    """Recompute after preemption refills the sequences' rows of the persistent block table."""
    fam = families["llama"]
    oracle = PeftOracle(fam)
    engine = make_engine(fam, attention_backend="triton", num_kv_blocks=6, block_size=8, max_num_batched_tokens=32,
                         enable_prefix_caching=False)
    try:
        names: list[str | None] = [None, *fam.adapters]
        requests = [(p, names[i % len(names)]) for i, p in enumerate(random_prompts(5, 41, 6, 14))]
        got = asyncio.run(run_requests(engine, requests, 6))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, 6), adapter
        assert engine.stats().preemptions > 0
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
