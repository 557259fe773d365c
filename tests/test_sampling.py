"""Per-request sampling inside mixed batches."""

from __future__ import annotations

import asyncio

import pytest

from engine import Engine, SamplingParams
from tests.helpers import TinyFamily, make_engine, random_prompts


@pytest.fixture(scope="module")
def engine(families: dict[str, TinyFamily]) -> Engine:
    eng = make_engine(families["llama"])
    yield eng
    eng.shutdown()


def complete(engine: Engine, prompt: str, params: SamplingParams, adapter: str | None = None) -> list[int]:
    return list(asyncio.run(engine.complete(prompt, params, adapter)).token_ids)


def test_seed_gives_same_tokens_alone_and_in_a_mixed_batch(engine: Engine) -> None:
    prompt = "the quick brown fox"
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95, seed=1234, ignore_eos=True)
    alone = complete(engine, prompt, params, "qv-r4")

    async def crowd() -> list[int]:
        others = [
            engine.complete(p, SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.9, ignore_eos=True), a)
            for p, a in zip(random_prompts(12, 5), [None, "qv-r4", "all-r64", "mlp-r8-pattern"] * 3)
        ]
        results = await asyncio.gather(engine.complete(prompt, params, "qv-r4"), *others)
        return list(results[0].token_ids)

    assert asyncio.run(crowd()) == alone
    different_seed = complete(engine, prompt, SamplingParams(**{**params.__dict__, "seed": 99}), "qv-r4")
    assert different_seed != alone
    engine.check_idle_invariants()


def test_top_k_1_equals_greedy(engine: Engine) -> None:
    prompt = "paged attention decode"
    greedy = complete(engine, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), "all-r64")
    top1 = complete(engine, prompt, SamplingParams(max_new_tokens=12, do_sample=True, top_k=1, temperature=2.0, ignore_eos=True), "all-r64")
    assert top1 == greedy


def test_unseeded_sampling_reports_its_seed_and_reproduces(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.0, ignore_eos=True, typical_p=0.9)
    first = asyncio.run(engine.complete("model cache", params))
    assert first.seed is not None
    again = asyncio.run(engine.complete("model cache", SamplingParams(**{**params.__dict__, "seed": first.seed})))
    assert again.token_ids == first.token_ids


def test_stop_sequence_cuts_exactly(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    full = asyncio.run(engine.complete("ray serve base", params)).generated_text
    assert full and len(full) > 6
    stop = full[3:6]
    cut = asyncio.run(engine.complete("ray serve base", SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))))
    assert cut.finish_reason == "stop_sequence"
    assert cut.generated_text == full[: full.index(stop)]
    kept = asyncio.run(
        engine.complete("ray serve base", SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True))
    )
    assert kept.generated_text == full[: full.index(stop) + len(stop)]


def test_streamed_text_adds_up_and_logprobs_are_reported(engine: Engine) -> None:
    async def stream() -> tuple[str, list, object]:
        text, tokens, last = "", [], None
        async for out in engine.generate("token model", SamplingParams(max_new_tokens=15, ignore_eos=True, top_n_tokens=3), "qv-r4"):
            text += out.text
            tokens.extend(out.tokens)
            last = out
        return text, tokens, last

    text, tokens, last = asyncio.run(stream())
    assert last.finished and last.finish_reason == "length"
    assert text == last.generated_text
    assert len(tokens) == 15 == last.generated_tokens
    assert all(t.logprob is not None and t.logprob <= 0 for t in tokens)


def test_repetition_penalty_changes_greedy_output(engine: Engine) -> None:
    plain = complete(engine, "the the the the", SamplingParams(max_new_tokens=16, ignore_eos=True))
    penalised = complete(engine, "the the the the", SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=5.0))
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


def test_eos_finishes_request(engine: Engine) -> None:
    eos = next(iter(engine.eos_token_ids))
    # A random model rarely picks EOS greedily; at temperature 50 every token is about equally likely
    # (p(EOS) ~ 1/512 per draw), so some of these 600 seeded draws hit it, deterministically.
    for seed in range(200):
        out = asyncio.run(
            engine.complete("a", SamplingParams(max_new_tokens=3, do_sample=True, temperature=50.0, seed=seed, top_k=0))
        )
        if eos in out.token_ids:
            assert out.finish_reason == "eos_token"
            assert out.token_ids[-1] == eos
            return
    pytest.skip("no EOS sampled in 200 seeds")
