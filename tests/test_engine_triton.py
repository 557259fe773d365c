"""The engine with the Triton LoRA kernels forced (CPU: Triton's interpreter) still matches PEFT."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import PeftOracle, TinyFamily, make_engine, random_prompts, run_requests

pytest.importorskip("triton")


@pytest.mark.slow
def test_triton_path_matches_peft(families: dict[str, TinyFamily]) -> None:
    fam = families["llama"]
    oracle = PeftOracle(fam)
    engine = make_engine(fam, lora_backend="triton")
    try:
        names: list[str | None] = [None, *fam.adapters]
        requests = [(p, names[i % len(names)]) for i, p in enumerate(random_prompts(6, 17, 2, 12))]
        got = asyncio.run(run_requests(engine, requests, 6))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, 6), adapter
        assert engine.runner.lora_ops.backend == "triton"
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
