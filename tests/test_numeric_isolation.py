"""Numerical isolation: NaN / Inf / overflowing adapters never reach other requests (issue 11).

Bad weights are written straight into device slots (`AdapterSlots.write` with `LoraAdapter` objects
built here), bypassing adapter-file validation: the runtime defence must hold even when bad values
reach the device (a float16 overflow, a corrupted copy). What is checked:

- the LoRA ops (torch reference and Triton, the latter under TRITON_INTERPRET=1 on CPU) give base
  rows exactly the base output and other slots' rows exactly their clean output;
- a slot reused by a smaller-rank adapter keeps none of its previous occupant's rows;
- attention padding reads only the row's own data, whatever the rest of the cache holds;
- the sampler skips non-finite rows without touching the others;
- in the engine a bad request fails alone with NonFiniteOutputError, good batch-mates are token-identical
  to running alone, the failure is counted per adapter, and a later batch reusing the freed (still
  NaN-holding) KV blocks is token-identical to running alone;
- over HTTP the bad request gets a generation error naming the adapter, its batch-mates 200, and
  /metrics counts it in loraserve_nonfinite_outputs_total.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig

from engine import AdapterSpec, Engine, EngineConfig, NonFiniteOutputError, SamplingParams
from engine.adapter_slots import AdapterSlots
from engine.adapters import LoraAdapter, LoraModuleWeights
from engine.attention import (
    AttentionBatch,
    DecodeGroup,
    KVCache,
    PrefillSpan,
    padded_kv_slots,
    paged_attention,
)
from engine.block_manager import BlockManager
from engine.model_arch import ModelArch
from engine.sampler import SampleRow, sample
from kernels.lora_ops import LoraBatch, LoraOps
from models.synthetic import build_adapter
from serve_app.backends import LocalBackend
from serve_app.core import ReplicaCore
from serve_app.errors import error_info, tgi_error_body, tgi_status
from serve_app.http_app import create_app
from serve_app.metrics import ReplicaMetrics
from serve_app.metrics_exposition import render_prometheus
from tests.helpers import TinyFamily, build_family, make_engine

# Overflow inside Triton's interpreter (numpy) is what the poisoned slots are for.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

NO_TRITON = importlib.util.find_spec("triton") is None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON, reason="triton is not installed"))]
NAN, INF = float("nan"), float("inf")
# Poison values: NaN and Inf as stored, 1e30 and 1e19 finite in float32 but overflowing once multiplied.
POISONS = {"nan": NAN, "inf": INF, "1e30": 1e30, "1e19": 1e19}


# ---- LoRA ops ------------------------------------------------------------------------------------

S, R, IN, OUT, OFFSET = 4, 16, 48, 40, 4
GOOD_SLOTS, BAD_SLOTS = (0, 2), (1, 3)


def _stacks(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(S, R, IN, generator=gen) * 0.2
    b = torch.randn(S, OUT, R, generator=gen) * 0.2
    return a, b, torch.tensor([0.5, 2.0, 1.0, 0.25])


def _poisoned(a: torch.Tensor, b: torch.Tensor, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = a.clone(), b.clone()
    for slot in BAD_SLOTS:
        a[slot] = value * torch.sign(a[slot])
        b[slot] = value * torch.sign(b[slot])
    return a, b


def _check_rows(row_slots: list[int], base: torch.Tensor, clean: torch.Tensor, dirty: torch.Tensor) -> None:
    for row, slot in enumerate(row_slots):
        if slot < 0:
            assert torch.equal(dirty[row], base[row]), f"base row {row} changed"
        elif slot in GOOD_SLOTS:
            assert torch.equal(dirty[row], clean[row]), f"row {row} (good slot {slot}) saw a bad slot"
        else:
            # Outside the LoRA column slice nothing changes, even for a bad row.
            assert torch.equal(dirty[row, :OFFSET], base[row, :OFFSET])
            assert torch.equal(dirty[row, OFFSET + OUT :], base[row, OFFSET + OUT :])
            assert not torch.isfinite(dirty[row, OFFSET : OFFSET + OUT]).all(), "the poison never reached its own row"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", list(POISONS))
def test_bgmv_rows_see_only_their_own_slot(backend: str, poison: str) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b, scaling = _stacks(gen)
    row_slots = [-1, 0, 1, 2, -1, 3, 0, 1, 2, -1]
    slots = torch.tensor(row_slots)
    x = torch.randn(len(row_slots), IN, generator=gen)
    base = torch.randn(len(row_slots), OFFSET + OUT + 3, generator=gen)
    impl = LoraOps(backend).impl_for(x)

    def run(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = base.clone()
        h = impl.bgmv_shrink(x, a, slots)
        impl.bgmv_expand(h, b, slots, scaling, out, OFFSET)
        return h, out

    h_clean, clean = run(a, b)
    h_dirty, dirty = run(*_poisoned(a, b, POISONS[poison]))
    for row, slot in enumerate(row_slots):
        if slot < 0:
            assert torch.equal(h_dirty[row], torch.zeros(R))
        elif slot in GOOD_SLOTS:
            assert torch.equal(h_dirty[row], h_clean[row])
    _check_rows(row_slots, base, clean, dirty)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", list(POISONS))
def test_sgmv_segments_see_only_their_own_slot(backend: str, poison: str) -> None:
    gen = torch.Generator().manual_seed(2)
    a, b, scaling = _stacks(gen)
    # Segments shorter than the kernels' row tiles (16+), so one tile spans several segments.
    segments = [(0, 3, -1), (3, 5, 1), (8, 4, 0), (12, 6, 3), (18, 2, -1), (20, 3, 2), (23, 2, 1)]
    starts, lens, seg_slots = (torch.tensor(col) for col in zip(*segments))
    row_slots = [slot for _, length, slot in segments for _ in range(length)]
    x = torch.randn(len(row_slots), IN, generator=gen)
    base = torch.randn(len(row_slots), OFFSET + OUT + 3, generator=gen)
    impl = LoraOps(backend).impl_for(x)

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        h = impl.sgmv_shrink(x, a, starts, lens, seg_slots)
        impl.sgmv_expand(h, b, starts, lens, seg_slots, scaling, out, OFFSET)
        return out

    _check_rows(row_slots, base, run(a, b), run(*_poisoned(a, b, POISONS[poison])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_prefill_and_decode_batch_is_isolated(backend: str) -> None:
    """LoraOps.apply over prefill segments and decode tokens at once, bad slots in both parts."""
    gen = torch.Generator().manual_seed(3)
    a, b, scaling = _stacks(gen)
    row_slots = [1, 1, 1, -1, -1, 0, 0, 0, 0, 3, 2, -1, 1, 0, 3]
    batch = LoraBatch.build(row_slots, num_prefill_tokens=9, device="cpu")
    x = torch.randn(len(row_slots), IN, generator=gen)
    base = torch.randn(len(row_slots), OFFSET + OUT + 3, generator=gen)
    ops = LoraOps(backend)

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = base.clone()
        ops.apply(x, out, a, b, scaling, batch, OFFSET)
        return out

    _check_rows(row_slots, base, run(a, b), run(*_poisoned(a, b, NAN)))


def _arch(fam: TinyFamily) -> ModelArch:
    return ModelArch.from_hf_config(AutoConfig.from_pretrained(str(fam.base)))


def _direct_adapter(
    adapter_id: str, arch: ModelArch, rank: int, targets: Sequence[str], value: float | None, seed: int
) -> LoraAdapter:
    """A LoraAdapter built in memory (no file, no validation); `value` replaces every weight's magnitude."""
    gen = torch.Generator().manual_seed(seed)
    shapes = arch.module_shapes()
    weights = {}
    for layer in range(arch.num_layers):
        for module in targets:
            in_features, out_features = shapes[module]
            a = torch.randn(rank, in_features, generator=gen) * 0.1
            b = torch.randn(out_features, rank, generator=gen) * 0.1
            if value is not None:
                a, b = value * torch.sign(a), value * torch.sign(b)
            weights[(layer, module)] = LoraModuleWeights(a, b, 2.0)
    return LoraAdapter(adapter_id, "memory", rank, tuple(targets), weights, None)


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reused_slot_keeps_nothing_of_a_nan_adapter_with_a_larger_rank(isolation: TinyFamily, backend: str) -> None:
    arch = _arch(isolation)
    nan16 = _direct_adapter("nan", arch, 16, ALL_TARGETS, NAN, seed=1)
    good4 = _direct_adapter("good", arch, 4, ("q_proj", "v_proj"), None, seed=2)
    reused = AdapterSlots(arch, num_slots=2, max_rank=16, dtype=torch.float32, device="cpu")
    reused.write(1, nan16)
    reused.clear(1)
    reused.write(1, good4)
    fresh = AdapterSlots(arch, num_slots=2, max_rank=16, dtype=torch.float32, device="cpu")
    fresh.write(1, good4)
    for layer, modules in enumerate(reused.layers):
        for module, stack in modules.items():
            want = fresh.layers[layer].get(module)
            if want is None:  # a module only the NaN adapter targeted: the slot holds nothing there
                assert not stack.lora_a[1].any() and not stack.lora_b[1].any() and stack.scaling[1] == 0
                continue
            assert torch.equal(stack.lora_a, want.lora_a), (layer, module)
            assert torch.equal(stack.lora_b, want.lora_b), (layer, module)
            assert torch.equal(stack.scaling, want.scaling), (layer, module)
    # And through the ops: the reused slot's rows get exactly what a fresh slot gives.
    stack, want = reused.layers[0]["q_proj"], fresh.layers[0]["q_proj"]
    x = torch.randn(6, arch.hidden_size, generator=torch.Generator().manual_seed(4))
    batch = LoraBatch.build([1, 1, 1, 1, -1, 1], num_prefill_tokens=3, device="cpu")
    outs = []
    for w in (stack, want):
        out = torch.zeros(6, w.lora_b.shape[1])
        LoraOps(backend).apply(x, out, w.lora_a, w.lora_b, w.scaling, batch)
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


# ---- attention -----------------------------------------------------------------------------------


def test_padded_kv_slots_pad_with_the_rows_own_first_slot() -> None:
    tables, lengths, bs = [[5, 2], [7], [1, 3, 4]], [6, 3, 9], 4
    slots = padded_kv_slots(tables, lengths, bs, "cpu")
    assert slots.shape == (3, 9)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        own = [table[p // bs] * bs + p % bs for p in range(length)]
        assert slots[row, :length].tolist() == own
        assert slots[row, length:].tolist() == [table[0] * bs] * (9 - length)


BS, HKV, HEADS, D = 4, 2, 4, 8


def _attention_step(fill: float, decode_lens: list[int], prefill: tuple[int, int]) -> torch.Tensor:
    """One step over a cache whose every slot not written by these sequences holds `fill`.

    Block 0 belongs to another sequence (its garbage is what slot-0 padding used to read). Decode rows
    have context lengths `decode_lens`; `prefill` = (cached tokens, new tokens) of one prefill chunk.
    """
    gen = torch.Generator().manual_seed(5)
    blocks = BlockManager(16, BS)
    kv = KVCache(1, 16, BS, HKV, D, torch.float32, "cpu")
    kv.k.fill_(fill)
    kv.v.fill_(fill)
    blocks.ensure("someone-else", BS)
    seqs = [(f"d{i}", n - 1, 1) for i, n in enumerate(decode_lens)] + [("p", *prefill)]
    for sid, cached, new in seqs:
        blocks.ensure(sid, cached + new)
        past = [blocks.slot(sid, p) for p in range(cached)]
        if past:  # context written by earlier steps
            kv.k[0, past] = torch.randn(len(past), HKV, D, generator=gen)
            kv.v[0, past] = torch.randn(len(past), HKV, D, generator=gen)
    # This step: the prefill chunk first, then one token per decode row (the runner's order).
    order = [seqs[-1], *seqs[:-1]]
    slot_mapping = [blocks.slot(sid, p) for sid, cached, new in order for p in range(cached, cached + new)]
    positions = [p for _, cached, new in order for p in range(cached, cached + new)]
    t = len(slot_mapping)
    q = torch.randn(t, HEADS, D, generator=gen)
    k = torch.randn(t, HKV, D, generator=gen)
    v = torch.randn(t, HKV, D, generator=gen)
    cached, new = prefill
    span = PrefillSpan(0, new, cached + new, padded_kv_slots([blocks.table("p")], [cached + new], BS, "cpu")[0])
    ids = [sid for sid, _, _ in seqs[:-1]]
    group = DecodeGroup(
        start=new, end=t, kv_slots=padded_kv_slots([blocks.table(s) for s in ids], decode_lens, BS, "cpu"),
        context_lens=torch.tensor(decode_lens), positions=torch.tensor([n - 1 for n in decode_lens]),
    )
    attn = AttentionBatch(torch.tensor(positions), torch.tensor(slot_mapping), [span], new, [group])
    return paged_attention(q, k, v, kv, 0, attn, D**-0.5, sliding_window=None)


@pytest.mark.parametrize("fill", [NAN, INF, -INF, 1e30])
def test_attention_reads_nothing_but_the_rows_own_data(fill: float) -> None:
    decode_lens, prefill = [3, 6, 11, 2], (5, 6)
    clean = _attention_step(0.0, decode_lens, prefill)
    dirty = _attention_step(fill, decode_lens, prefill)
    assert torch.isfinite(clean).all()
    assert torch.equal(dirty, clean)


# ---- sampler -------------------------------------------------------------------------------------


def test_sampler_skips_non_finite_rows_and_leaves_the_others_as_they_were() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 64, generator=gen) * 3
    logits[1, 7] = NAN
    logits[3, 0] = INF
    logits[5] = -INF
    params = [
        SamplingParams(top_n_tokens=3),
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7, top_n_tokens=2),
        SamplingParams(do_sample=True, seed=8),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(),
    ]

    def rows(indices: list[int]) -> list[SampleRow]:
        return [
            SampleRow(params[i], torch.Generator().manual_seed(params[i].seed or 0), [1, 2, 2, 9], [2, 9])
            for i in indices
        ]

    got = sample(logits.clone(), rows(list(range(6))))
    assert got.nonfinite == (1, 3, 5)
    for i in got.nonfinite:
        assert got.token_ids[i] == -1 and math.isnan(got.logprobs[i]) and got.top_tokens[i] == []
    for i in (0, 2, 4):
        alone = sample(logits[i : i + 1].clone(), rows([i]))
        assert alone.nonfinite == ()
        assert (got.token_ids[i], got.logprobs[i], got.top_tokens[i]) == (
            alone.token_ids[0], alone.logprobs[0], alone.top_tokens[0]
        )


# ---- engine --------------------------------------------------------------------------------------

# name -> poison value written into the slot (A and B of q/k/v in every layer, so K/V in the cache go bad).
BAD_ADAPTERS = {"nan-kv": NAN, "huge-1e30": 1e30, "overflow-1e19": 1e19}
GOOD = [None, "qv-r4", "attn-r16-rslora", "all-r64", "mlp-r8-pattern"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def isolation(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    root: Path = tmp_path_factory.mktemp("isolation")
    fam = build_family(root, "llama")
    for i, name in enumerate(BAD_ADAPTERS):
        # Finite on disk (they load and validate); the poison goes into their device slots.
        fam.adapters[name] = build_adapter(root / name, fam.base, rank=8, targets=("q_proj", "k_proj", "v_proj"),
                                           seed=200 + i)
    return fam


def _poison_slot(engine: Engine, adapter_id: str, value: float) -> None:
    """Make `adapter_id` resident, then overwrite its slot with bad weights of the same shape."""
    slot = engine.pool.acquire(adapter_id)
    assert slot is not None
    engine.pool.release(adapter_id, slot)
    bad = _direct_adapter(adapter_id, engine.arch, 8, ("q_proj", "k_proj", "v_proj"), value, seed=9)
    engine.pool.slots.write(slot, bad)


async def _run(engine: Engine, requests: Sequence[tuple[list[int], str | None]]) -> list[list[int] | BaseException]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(prompt: list[int], adapter: str | None) -> list[int]:
        return list((await engine.complete(prompt, params, adapter)).token_ids)

    return list(await asyncio.gather(*(one(p, a) for p, a in requests), return_exceptions=True))


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 400, (length,), generator=gen).tolist()


def _alone(engine: Engine, requests: Sequence[tuple[list[int], str | None]]) -> list[list[int]]:
    out = []
    for request in requests:
        (tokens,) = asyncio.run(_run(engine, [request]))
        assert isinstance(tokens, list), tokens
        out.append(tokens)
    return out


def _cache_holds_nan(engine: Engine) -> bool:
    return bool(torch.isnan(engine.kv.k).any() or torch.isnan(engine.kv.v).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_adapters_fail_alone_and_leave_batch_mates_and_cache_untouched(
    isolation: TinyFamily, backend: str
) -> None:
    bad_names = list(BAD_ADAPTERS) if backend == "torch" else ["nan-kv"]
    good_names = GOOD if backend == "torch" else [None, "qv-r4", "attn-r16-rslora"]  # interpreted: keep it small
    # The first bad prompt is longer than the step budget: it writes NaN K/V from block 0 on, then
    # the good requests are admitted beside its last chunk. It fails there and frees block 0 (still
    # NaN) while the good ones decode on, padded (distinct lengths) but never reading it.
    good = [(_prompt(3 + 2 * i, seed=i), name) for i, name in enumerate(good_names)]
    # Needs more blocks than the good requests freed last, so it reuses the failed requests' blocks too.
    later = [*good, (_prompt(40, seed=50), None), (_prompt(30, seed=51), good_names[1])]
    bad = [(_prompt(100 if i == 0 else 5, seed=60 + i), name) for i, name in enumerate(bad_names)]

    engine = make_engine(isolation, lora_backend=backend, max_num_batched_tokens=96)
    try:
        assert engine.runner.lora_ops.backend == backend
        want_good = _alone(engine, good)
        want_later = _alone(engine, later)
        for name in bad_names:
            _poison_slot(engine, name, BAD_ADAPTERS[name])
        assert not _cache_holds_nan(engine)

        got = asyncio.run(_run(engine, [*bad, *good]))
        for (_, name), result in zip(bad, got):
            assert isinstance(result, NonFiniteOutputError), (name, result)
            assert result.adapter_id == name
            assert str(result) == f"adapter {name!r} produced non-finite logits (NaN or Inf); the request was stopped"
        assert got[len(bad) :] == want_good
        stats = engine.stats()
        assert stats.nonfinite_by_adapter == {name: 1 for name in bad_names}
        assert stats.failed == len(bad_names)
        engine.check_idle_invariants()

        # The failed requests' blocks went back to the free list with their NaN K/V in them.
        assert _cache_holds_nan(engine)
        assert asyncio.run(_run(engine, later)) == want_later
        engine.check_idle_invariants()
        assert engine.stats().nonfinite_by_adapter == {name: 1 for name in bad_names}
    finally:
        engine.shutdown()


def test_garbage_in_every_free_kv_block_changes_no_token(isolation: TinyFamily) -> None:
    requests = [(_prompt(n, seed=70 + n), name) for n, name in zip((4, 19, 33, 8, 50), GOOD)]
    # Without prefix caching: with it, idle blocks also hold cached K/V kept for reuse (overwriting them
    # is corrupting the cache, not stale data); tests/test_prefix_cache.py checks what is reused.
    engine = make_engine(isolation, lora_backend="torch", enable_prefix_caching=False)
    try:
        want = _alone(engine, requests)
        for fill in (NAN, INF):
            engine.kv.k.fill_(fill)  # idle: every block is free
            engine.kv.v.fill_(-fill)
            assert asyncio.run(_run(engine, requests)) == want
        assert engine.stats().nonfinite_by_adapter == {}
    finally:
        engine.shutdown()


def test_float16_overflow_fails_only_the_overflowing_request(isolation: TinyFamily, tmp_path: Path) -> None:
    """Weights that are finite (and pass validation) but overflow float16 at run time."""
    overflow = build_adapter(tmp_path / "f16-overflow", isolation.base, rank=8, alpha=16.0,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=300, std=100.0)
    specs = (*isolation.specs(), AdapterSpec("f16-overflow", str(overflow)))
    good = [(_prompt(5 + 6 * i, seed=80 + i), name) for i, name in enumerate(GOOD[:3])]
    engine = make_engine(isolation, adapters=specs, dtype="float16", lora_backend="torch")
    try:
        want = _alone(engine, good)
        got = asyncio.run(_run(engine, [(_prompt(40, seed=90), "f16-overflow"), *good]))
        assert isinstance(got[0], NonFiniteOutputError) and got[0].adapter_id == "f16-overflow"
        assert got[1:] == want
        assert engine.stats().nonfinite_by_adapter == {"f16-overflow": 1}
        assert asyncio.run(_run(engine, good)) == want
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_prompt_logprobs_of_a_nan_request_are_never_recorded(isolation: TinyFamily) -> None:
    """Prompt-logprob rows are logits too: NaN ones fail the request (once), batch-mates keep theirs."""
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, prompt_logprobs=True)
    good_prompt = _prompt(12, seed=3)
    engine = make_engine(isolation, lora_backend="torch")
    try:
        alone = asyncio.run(engine.complete(good_prompt, params, "qv-r4"))
        _poison_slot(engine, "nan-kv", NAN)

        async def both() -> list[Any]:
            return await asyncio.gather(engine.complete(_prompt(30, seed=61), params, "nan-kv"),
                                        engine.complete(good_prompt, params, "qv-r4"), return_exceptions=True)

        bad, good = asyncio.run(both())
        assert isinstance(bad, NonFiniteOutputError) and bad.adapter_id == "nan-kv"
        assert good.token_ids == alone.token_ids
        assert [t.logprob for t in good.prefill] == pytest.approx([t.logprob for t in alone.prefill], abs=1e-5)
        assert engine.stats().nonfinite_by_adapter == {"nan-kv": 1}
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


# ---- serve layer ---------------------------------------------------------------------------------

HTTP_PROMPT = "the quick brown fox jumps over the lazy dog"


def test_http_bad_adapter_gets_a_generation_error_and_its_batch_mates_200(isolation: TinyFamily) -> None:
    config = EngineConfig(model=str(isolation.base), adapters=isolation.specs(), max_adapter_slots=8,
                          max_lora_rank=64, num_kv_blocks=256)
    core = ReplicaCore(config, "tiny")
    try:
        good = [None, "qv-r4", "all-r64"]
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        want = [asyncio.run(core.engine.complete(HTTP_PROMPT, params, name)).generated_text for name in good]
        _poison_slot(core.engine, "nan-kv", NAN)
        responses, stream, openai, metrics = asyncio.run(_http_calls(create_app(LocalBackend(core)), good))
    finally:
        core.shutdown()
    message = "adapter 'nan-kv' produced non-finite logits (NaN or Inf); the request was stopped"
    bad, *ok = responses
    assert bad.status_code == 424 and bad.json() == {"error": message, "error_type": "generation"}
    assert [r.status_code for r in ok] == [200] * len(good)
    assert [r.json()["generated_text"] for r in ok] == want
    assert stream.status_code == 424 and stream.json() == {"error": message, "error_type": "generation"}
    assert openai.status_code == 500
    assert openai.json() == {"error": {"message": message, "type": "server_error", "param": "model", "code": None}}
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    counts = {s.labels["adapter"]: s.value for s in families["loraserve_nonfinite_outputs"].samples
              if s.name.endswith("_total")}
    assert counts == {"nan-kv": 3.0}


async def _http_calls(
    app: Any, good: list[str | None]
) -> tuple[list[httpx.Response], httpx.Response, httpx.Response, httpx.Response]:
    def tgi(adapter: str | None) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": NEW_TOKENS}
        if adapter is not None:
            parameters["adapter_id"] = adapter
        return {"inputs": HTTP_PROMPT, "parameters": parameters}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=tgi(a)) for a in ["nan-kv", *good]))
        stream = await client.post("/generate_stream", json=tgi("nan-kv"))
        openai = await client.post("/v1/completions", json={"model": "nan-kv", "prompt": HTTP_PROMPT, "max_tokens": 4})
        metrics = await client.get("/metrics")
    return list(responses), stream, openai, metrics


def test_nonfinite_error_maps_to_a_generation_error_naming_the_adapter() -> None:
    info = error_info(NonFiniteOutputError("sql"))
    assert info["kind"] == "generation" and info["field"] == "adapter_id"
    assert tgi_status(info) == 424
    assert tgi_error_body(info) == {
        "error": "adapter 'sql' produced non-finite logits (NaN or Inf); the request was stopped",
        "error_type": "generation",
    }
    base = error_info(NonFiniteOutputError(None))
    assert base["field"] is None and base["message"].startswith("the base model produced non-finite logits")


def test_nonfinite_outputs_are_exported_per_adapter() -> None:
    snapshot = {"replica": "r1", "metrics": ReplicaMetrics().snapshot(),
                "engine": {"nonfinite_by_adapter": {"sql": 3, "": 1}}}
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus([snapshot], {}).decode())}
    family = families["loraserve_nonfinite_outputs"]
    assert family.type == "counter"
    samples = {(s.labels["replica"], s.labels["adapter"]): s.value for s in family.samples if s.name.endswith("_total")}
    assert samples == {("r1", "sql"): 3.0, ("r1", "__base__"): 1.0}
