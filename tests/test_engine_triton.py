"""The engine on its GPU path still matches PEFT: Triton LoRA kernels forced on the CPU (Triton's
interpreter), and, marked `gpu`, the whole CUDA path (Triton LoRA + paged attention, CUDA graphs on
and off) against transformers + PEFT on the same GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

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


def _mixed_requests(families: dict[str, TinyFamily], family: str, n: int) -> list[tuple[str, str | None]]:
    names: list[str | None] = [None, *families[family].adapters]
    return [(p, names[i % len(names)]) for i, p in enumerate(random_prompts(n, 29, 2, 30))]


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_cuda_engine_matches_peft_on_cuda(families: dict[str, TinyFamily], family: str, enforce_eager: bool) -> None:
    """Greedy float32, mixed adapters of ranks 4..64, requests arriving while others decode."""
    from kernels import triton_lora

    fam = families[family]
    oracle = PeftOracle(fam, device="cuda")
    engine = make_engine(fam, device="cuda", enforce_eager=enforce_eager)
    try:
        requests = _mixed_requests(families, family, 20)
        got = asyncio.run(run_requests(engine, requests, 16, stagger_s=0.01))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == oracle.greedy(prompt, adapter, 16), (adapter, prompt)
        assert engine.runner.lora_ops.impl_for(torch.empty(1, device="cuda")) is triton_lora
        assert engine.runner.attention_backend == "triton"
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens_in_bfloat16(families: dict[str, TinyFamily]) -> None:
    """Replaying a captured decode step (padded to its bucket) changes no token, in bfloat16 too."""
    fam = families["llama"]
    requests = _mixed_requests(families, "llama", 24)
    tokens: dict[bool, list[list[int]]] = {}
    for enforce_eager in (True, False):
        engine = make_engine(fam, device="cuda", dtype="bfloat16", enforce_eager=enforce_eager)
        try:
            # All at once, no stagger: both runs see the same arrivals, so only graphs vs eager differs.
            tokens[enforce_eager] = asyncio.run(run_requests(engine, requests, 24))
            engine.check_idle_invariants()
        finally:
            engine.shutdown()
    assert tokens[False] == tokens[True]
