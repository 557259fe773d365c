"""Greedy float32 tokens of the engine equal transformers + PEFT on the same weights."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.helpers import PeftOracle, TinyFamily, make_engine, random_prompts, run_requests

FAMILIES = ("llama", "mistral", "qwen2")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def oracles(families: dict[str, TinyFamily]) -> dict[str, PeftOracle]:
    return {name: PeftOracle(fam) for name, fam in families.items()}


def mixed_requests(fam: TinyFamily, n: int, seed: int) -> list[tuple[str, str | None]]:
    rng = random.Random(seed)
    choices: list[str | None] = [None, *fam.adapters]
    prompts = random_prompts(n, seed, 1, 40)
    # every adapter and the base at least twice, the rest random
    adapters = [choices[i % len(choices)] for i in range(n)]
    rng.shuffle(adapters)
    return list(zip(prompts, adapters))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_adapter_alone_and_base(family: str, families: dict[str, TinyFamily], oracles: dict[str, PeftOracle]) -> None:
    fam, oracle = families[family], oracles[family]
    engine = make_engine(fam)
    try:
        prompt = random_prompts(1, 7, 12, 12)[0]
        outputs = {}
        for adapter in [None, *fam.adapters]:
            got = asyncio.run(run_requests(engine, [(prompt, adapter)], NEW_TOKENS))[0]
            assert got == oracle.greedy(prompt, adapter, NEW_TOKENS), f"{family}/{adapter}"
            outputs[adapter] = got
            engine.check_idle_invariants()
        # the adapters really change the model, so the comparison above can fail
        assert len({tuple(v) for v in outputs.values()}) == len(outputs)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft(family: str, families: dict[str, TinyFamily], oracles: dict[str, PeftOracle]) -> None:
    fam, oracle = families[family], oracles[family]
    engine = make_engine(fam)
    try:
        requests = mixed_requests(fam, 20, seed=hash(family) % 1000)
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS), f"{family}/{adapter}: {prompt!r}"
        stats = engine.stats()
        assert stats.max_batch_seqs >= 10, stats  # they really ran together
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_arrivals_while_decoding(families: dict[str, TinyFamily], oracles: dict[str, PeftOracle]) -> None:
    fam, oracle = families["llama"], oracles["llama"]
    engine = make_engine(fam, max_num_batched_tokens=64)
    try:
        requests = mixed_requests(fam, 16, seed=3)
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS, stagger_s=0.01))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS)
        stats = engine.stats()
        assert stats.steps > NEW_TOKENS and stats.max_batch_seqs > 1
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_preemption_keeps_tokens(family: str, families: dict[str, TinyFamily], oracles: dict[str, PeftOracle]) -> None:
    fam, oracle = families[family], oracles[family]
    # 20 blocks x 8 tokens = 160 cache slots for 16 requests of 5-110 tokens each: must preempt.
    engine = make_engine(fam, num_kv_blocks=20, block_size=8, max_num_batched_tokens=64)
    try:
        requests = mixed_requests(fam, 16, seed=11)
        got = asyncio.run(run_requests(engine, requests, NEW_TOKENS))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, NEW_TOKENS)
        assert engine.stats().preemptions > 0
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
