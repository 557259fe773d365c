"""Prefix caching: the block manager's cache (unit and a hypothesis state machine) and the engine with it.

The state machine checks more than bookkeeping: every position a sequence computes is written into a
shadow of the cache as (identity, the tokens up to it), and every block a lookup hands out must hold
exactly what the sequence would have computed there itself.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client.parser import text_string_to_metric_families

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams, adapter_reader
from engine.adapters import LoraAdapter
from engine.block_manager import BlockManager
from engine.errors import AdapterBusyError
from engine.prefix_cache import BASE_IDENTITY, identity_of
from engine.sequence import Sequence
from models.synthetic import build_adapter
from serve_app.metrics import ReplicaMetrics
from serve_app.metrics_exposition import render_prometheus
from serve_app.stats_keys import SNAPSHOT_ENGINE, SNAPSHOT_METRICS, SNAPSHOT_REPLICA
from tests.helpers import ADAPTER_RECIPES, PeftOracle, TinyFamily, make_engine, random_prompts, run_requests

BS = 4
BLOCK_SIZE = 16  # make_engine's


def seq_of(request_id: str, tokens: list[int], adapter_id: str | None = None) -> Sequence:
    return Sequence(request_id, adapter_id, list(tokens), SamplingParams(), 0.0)


def run_prefill(blocks: BlockManager, seq: Sequence, identity: str) -> None:
    """Admit `seq` from its hit and compute its whole prompt (the engine's step, without a model)."""
    hit = blocks.lookup(seq, identity)
    blocks.admit(seq, hit)
    seq.num_computed = hit.num_tokens
    assert blocks.ensure(seq.request_id, seq.num_tokens)
    seq.num_computed = seq.num_tokens
    blocks.cache_computed(seq)


# ---- the block manager -------------------------------------------------------------------------
def test_hit_reuses_full_blocks_and_recomputes_the_last_token() -> None:
    blocks = BlockManager(16, BS, enable_caching=True)
    first = seq_of("a", list(range(12)))
    run_prefill(blocks, first, BASE_IDENTITY)
    table_a = blocks.table("a")
    blocks.free("a")
    assert blocks.num_free == 16 and blocks.cache_stats().evictable_blocks == 3

    same = seq_of("b", list(range(12)))  # a full hit: the last block is recomputed for its logits
    hit = blocks.lookup(same, BASE_IDENTITY)
    assert hit.num_tokens == 8 and hit.blocks == tuple(table_a[:2])
    longer = seq_of("c", [*range(12), 99])
    assert blocks.lookup(longer, BASE_IDENTITY).num_tokens == 12
    diverged = seq_of("d", [0, 1, 2, 3, 4, 5, 6, 0, 8, 9])
    assert blocks.lookup(diverged, BASE_IDENTITY).num_tokens == 4
    other = seq_of("e", [*range(12), 99], adapter_id="x")
    assert blocks.lookup(other, identity_of("x", "digest")).num_tokens == 0  # another identity never shares

    blocks.admit(longer, blocks.lookup(longer, BASE_IDENTITY))
    assert blocks.table("c")[:2] == list(hit.blocks) and len(blocks.table("c")) == 3
    assert blocks.cache_stats().evictable_blocks == 0 and blocks.num_free == 13
    stats = blocks.cache_stats()
    assert (stats.queries, stats.hits) == (12 + 13, 12)
    blocks.check_invariants()


def test_shared_blocks_are_refcounted() -> None:
    blocks = BlockManager(8, BS, enable_caching=True)
    run_prefill(blocks, seq_of("a", list(range(9))), BASE_IDENTITY)
    b = seq_of("b", list(range(9)))
    hit = blocks.lookup(b, BASE_IDENTITY)
    assert hit.blocks == tuple(blocks.table("a")[:2])
    blocks.admit(b, hit)
    assert blocks.ensure("b", 9) and blocks.num_used == 4  # 3 of a's + b's own last block
    blocks.free("a")
    assert blocks.table("b")[:2] == list(hit.blocks) and blocks.num_used == 3
    assert blocks.cache_stats().evictable_blocks == 0  # the shared ones are still held by b
    blocks.free("b")
    assert blocks.num_used == 0
    blocks.check_invariants()


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed() -> None:
    blocks = BlockManager(6, BS, enable_caching=True)
    run_prefill(blocks, seq_of("old", [1] * 8), BASE_IDENTITY)  # 2 cached blocks
    run_prefill(blocks, seq_of("new", [2] * 8), BASE_IDENTITY)  # 2 more
    old_blocks, new_blocks = blocks.table("old"), blocks.table("new")
    blocks.free("old")
    blocks.free("new")
    assert blocks.ensure("x", 2 * BS)  # the two never-cached blocks go first: nothing evicted
    assert blocks.cache_stats().evictions == 0
    assert blocks.ensure("x", 3 * BS)  # then the least recently freed: old's tail block first
    assert blocks.table("x")[2] == old_blocks[1] and blocks.cache_stats().evictions == 1
    assert blocks.lookup(seq_of("o", [1] * 9), BASE_IDENTITY).num_tokens == 4  # its head survives
    assert blocks.lookup(seq_of("n", [2] * 9), BASE_IDENTITY).blocks == tuple(new_blocks)
    blocks.check_invariants()


def test_fits_counts_revived_blocks_against_the_free_list() -> None:
    blocks = BlockManager(3, BS, enable_caching=True)
    run_prefill(blocks, seq_of("a", list(range(8))), BASE_IDENTITY)
    blocks.free("a")
    seq = seq_of("b", [*range(8), 7, 7, 7, 7, 7])  # 13 tokens: 2 blocks hit, 2 more needed
    hit = blocks.lookup(seq, BASE_IDENTITY)
    assert hit.num_tokens == 8
    assert blocks.fits("b", 12, hit)  # 2 revived + 1 new = the 3 free blocks
    assert not blocks.fits("b", 13, hit)  # 2 revived + 2 new > 3


def test_caching_off_behaves_as_before() -> None:
    blocks = BlockManager(4, BS)
    seq = seq_of("a", list(range(8)))
    assert blocks.lookup(seq, BASE_IDENTITY).num_tokens == 0
    run_prefill(blocks, seq, BASE_IDENTITY)
    table = blocks.table("a")
    blocks.free("a")
    assert blocks.cache_stats().cached_blocks == 0
    assert blocks.ensure("b", 8) and blocks.table("b") == table  # most recently freed first, as before
    blocks.check_invariants()


# ---- the state machine ---------------------------------------------------------------------------
STREAMS = ([1, 2, 1, 2] * 5, [1, 2, 1, 2, 3, 3, 3, 3] * 3, [0, 0, 0, 0] * 5)  # shared and diverging prefixes
IDENTITIES = (BASE_IDENTITY, identity_of("a", "d1"), identity_of("a", "d2"))
NUM_BLOCKS = 10


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = BlockManager(NUM_BLOCKS, BS, enable_caching=True)
        self.live: dict[str, tuple[Sequence, str]] = {}
        self.shadow: dict[int, dict[int, tuple[str, tuple[int, ...]]]] = {}  # block -> offset -> what computed it
        self.cached: dict[tuple[str, tuple[int, ...]], int] = {}  # the model of the cache: (identity, tokens) -> block
        self.done: dict[str, int] = {}  # blocks of each sequence that went through registration
        self.ids = itertools.count()

    def _expected_hit(self, seq: Sequence, identity: str) -> tuple[int, ...]:
        tokens, found = seq.prompt_ids + seq.output_ids, []
        for i in range((len(tokens) - 1) // BS):
            block = self.cached.get((identity, tuple(tokens[: (i + 1) * BS])))
            if block is None:
                break
            found.append(block)
        return tuple(found)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        before = len(self.blocks.table(seq.request_id))
        if not self.blocks.ensure(seq.request_id, num_tokens):
            return False
        for block in self.blocks.table(seq.request_id)[before:]:  # handed out: any hash it had is gone
            self.cached = {k: b for k, b in self.cached.items() if b != block}
            self.shadow.pop(block, None)
        return True

    def _register(self, seq: Sequence, identity: str) -> None:
        self.blocks.cache_computed(seq)
        table, tokens = self.blocks.table(seq.request_id), seq.prompt_ids + seq.output_ids
        full = min(seq.num_computed // BS, len(table))
        for i in range(self.done[seq.request_id], full):
            key = (identity, tuple(tokens[: (i + 1) * BS]))
            if table[i] not in self.cached.values() and key not in self.cached:
                self.cached[key] = table[i]
        self.done[seq.request_id] = max(self.done[seq.request_id], full)

    @rule(stream=st.integers(0, len(STREAMS) - 1), length=st.integers(1, 18), tail=st.integers(0, 3),
          identity=st.sampled_from(IDENTITIES), chunk=st.integers(1, 12))
    def admit(self, stream: int, length: int, tail: int, identity: str, chunk: int) -> None:
        tokens = STREAMS[stream][:length] + ([tail] if tail else [])
        seq = seq_of(f"s{next(self.ids)}", tokens)
        hit = self.blocks.lookup(seq, identity)
        assert hit.blocks == self._expected_hit(seq, identity)
        assert hit.num_tokens == len(hit.blocks) * BS < seq.num_tokens
        for i, block in enumerate(hit.blocks):  # the K/V handed out are what this sequence would compute
            for offset in range(BS):
                pos = i * BS + offset
                assert self.shadow[block][offset] == (identity, tuple(tokens[: pos + 1])), "wrong KV reused"
        n = min(chunk, seq.num_tokens - hit.num_tokens)
        if not self.blocks.fits(seq.request_id, hit.num_tokens + n, hit):
            self.blocks.free(seq.request_id)  # stays waiting in a scheduler; here it just goes
            return
        self.blocks.admit(seq, hit)
        seq.num_computed = hit.num_tokens
        self.done[seq.request_id] = len(hit.blocks)
        self.live[seq.request_id] = (seq, identity)
        assert self._grow(seq, hit.num_tokens + n)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 9))
    def compute(self, data: st.DataObject, n: int) -> None:
        seq, identity = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        n = min(n, seq.num_tokens - seq.num_computed)
        if n == 0 or not self._grow(seq, seq.num_computed + n):
            return
        tokens, table = seq.prompt_ids + seq.output_ids, self.blocks.table(seq.request_id)
        for pos in range(seq.num_computed, seq.num_computed + n):
            block = table[pos // BS]
            others = [s for s, (o, _) in self.live.items() if s != seq.request_id and block in self.blocks.table(s)]
            assert not others, f"block {block} is written while {others} hold it"
            self.shadow.setdefault(block, {})[pos % BS] = (identity, tuple(tokens[: pos + 1]))
        seq.num_computed += n
        self._register(seq, identity)

    @precondition(lambda self: any(s.num_computed == s.num_tokens for s, _ in self.live.values()))
    @rule(data=st.data(), token=st.integers(0, 3))
    def sample(self, data: st.DataObject, token: int) -> None:
        done = sorted(r for r, (s, _) in self.live.items() if s.num_computed == s.num_tokens)
        self.live[data.draw(st.sampled_from(done))][0].output_ids.append(token)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep=st.booleans())
    def release(self, data: st.DataObject, keep: bool) -> None:
        """Finish, abort or preempt (keep: what it computed is registered first; a failure drops it)."""
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        seq, identity = self.live.pop(request_id)
        if keep:
            self._register(seq, identity)
        self.blocks.free(request_id)
        del self.done[request_id]

    @invariant()
    def bookkeeping_agrees(self) -> None:
        self.blocks.check_invariants()
        held = {b for r in self.live for b in self.blocks.table(r)}
        assert self.blocks.num_used == len(held) and self.blocks.num_free == NUM_BLOCKS - len(held)
        stats = self.blocks.cache_stats()
        assert stats.cached_blocks == len(self.cached)
        assert stats.evictable_blocks == sum(1 for b in self.cached.values() if b not in held)


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---- the engine ----------------------------------------------------------------------------------
NEW_TOKENS = 10
SYSTEM = random_prompts(1, 2026, 60, 60)[0]  # a shared "system prompt" of several blocks


def cache_hits(engine: Engine) -> int:
    return int(engine.stats().prefix_cache["hits"])


@pytest.fixture(scope="module")
def llama_oracle(families: dict[str, TinyFamily]) -> PeftOracle:
    return PeftOracle(families["llama"])


def test_prefix_caching_is_on_by_default() -> None:
    assert EngineConfig(model="m").enable_prefix_caching is True
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(model="m", enable_prefix_caching="yes").validate()  # type: ignore[arg-type]


def test_mixed_adapters_sharing_a_system_prompt(families: dict[str, TinyFamily], llama_oracle: PeftOracle) -> None:
    fam = families["llama"]
    identities: list[str | None] = [None, *fam.adapters]
    questions = random_prompts(2 * len(identities), 5, 2, 8)
    requests = [(f"{SYSTEM} {q}", identities[i % len(identities)]) for i, q in enumerate(questions)]
    on, off = make_engine(fam), make_engine(fam, enable_prefix_caching=False)
    try:
        # One request per identity, all in flight together: the same system prompt, yet nothing shared.
        first = asyncio.run(run_requests(on, requests[: len(identities)], NEW_TOKENS))
        assert cache_hits(on) == 0
        second = asyncio.run(run_requests(on, requests, NEW_TOKENS))
        reference = asyncio.run(run_requests(off, requests, NEW_TOKENS))
        assert first == reference[: len(identities)] and second == reference
        for (prompt, adapter), tokens in zip(requests, second):
            assert tokens == llama_oracle.greedy(prompt, adapter, NEW_TOKENS), f"{adapter}: {prompt!r}"
        system_blocks = (len(on.tokenize(SYSTEM)) - 1) // BLOCK_SIZE
        assert system_blocks >= 3
        assert cache_hits(on) >= len(requests) * system_blocks * BLOCK_SIZE  # every one started from its own
        assert cache_hits(off) == 0 and off.stats().prefix_cache["enabled"] is False
        on.check_idle_invariants()
        # what /metrics shows of it
        snapshot = {SNAPSHOT_REPLICA: "r1", SNAPSHOT_METRICS: ReplicaMetrics().snapshot(),
                    SNAPSHOT_ENGINE: on.stats().as_dict()}
        families = {f.name: f for f in text_string_to_metric_families(render_prometheus([snapshot], {}).decode())}
        assert families["loraserve_prefix_cache_hits"].samples[0].value == cache_hits(on)
        queries = families["loraserve_prefix_cache_queries"].samples[0].value
        assert queries == on.stats().prefix_cache["queries"] > cache_hits(on)
        blocks = {s.labels["state"]: s.value for s in families["loraserve_prefix_cache_blocks"].samples}
        assert blocks["in_use"] == 0 and blocks["evictable"] > 0  # idle: every cached block is evictable
    finally:
        on.shutdown()
        off.shutdown()


def test_reload_under_the_same_id_never_reuses_other_weights(
    families: dict[str, TinyFamily], tmp_path: Path, llama_oracle: PeftOracle
) -> None:
    fam = families["llama"]
    original = "attn-r16-rslora"
    swap = tmp_path / "swap"
    shutil.copytree(fam.adapters[original], swap)
    engine = make_engine(fam, adapters=(AdapterSpec("swap", str(swap)),))
    prompt = f"{SYSTEM} which adapter answers"

    def run() -> tuple[list[int], int]:
        before = cache_hits(engine)
        tokens = asyncio.run(run_requests(engine, [(prompt, "swap")], NEW_TOKENS))[0]
        return tokens, cache_hits(engine) - before

    try:
        tokens, hits = run()
        assert hits == 0 and tokens == llama_oracle.greedy(prompt, original, NEW_TOKENS)
        assert run() == (tokens, (len(engine.tokenize(prompt)) - 1) // BLOCK_SIZE * BLOCK_SIZE)
        engine.reload_adapter("swap")  # the same files: the same digest, so its blocks are still its own
        assert run()[1] > 0

        recipe = dict(ADAPTER_RECIPES[original])
        build_adapter(swap, fam.base, seed=4242, **recipe)  # other weights under the same id
        engine.reload_adapter("swap")
        changed, hits = run()
        assert hits == 0, "blocks computed by the old weights were reused after the reload"
        new_oracle = PeftOracle(TinyFamily(fam.family, fam.base, {"swap": swap}))
        assert changed == new_oracle.greedy(prompt, "swap", NEW_TOKENS) and changed != tokens
        assert run() == (changed, (len(engine.tokenize(prompt)) - 1) // BLOCK_SIZE * BLOCK_SIZE)

        engine.load_adapter(AdapterSpec("swap", str(fam.adapters["qv-r4"])))  # another adapter, same id
        other, hits = run()
        assert hits == 0 and other == llama_oracle.greedy(prompt, "qv-r4", NEW_TOKENS)
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_prompt_logprobs_are_computed_in_full_beside_a_cached_prefix(families: dict[str, TinyFamily]) -> None:
    fam = families["llama"]
    on, off = make_engine(fam), make_engine(fam, enable_prefix_caching=False)
    prompt, params = f"{SYSTEM} logprobs please", SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=True)
    try:
        asyncio.run(run_requests(on, [(prompt, "qv-r4")], NEW_TOKENS))  # warms the cache for this prompt
        before = cache_hits(on)
        got = asyncio.run(on.complete(prompt, params, "qv-r4"))
        assert cache_hits(on) == before  # read nothing from the cache
        want = asyncio.run(off.complete(prompt, params, "qv-r4"))
        assert got.token_ids == want.token_ids and len(got.prefill) == len(on.tokenize(prompt))
        assert [t.id for t in got.prefill] == [t.id for t in want.prefill]
        assert got.prefill[1:] and all(t.logprob is not None for t in got.prefill[1:])
        assert [t.logprob for t in got.prefill[1:]] == pytest.approx([t.logprob for t in want.prefill[1:]], abs=1e-5)
        # and what it computed is there for the next plain request
        asyncio.run(run_requests(on, [(prompt, "qv-r4")], NEW_TOKENS))
        assert cache_hits(on) > before
    finally:
        on.shutdown()
        off.shutdown()


def test_preemption_and_abort_with_the_cache(families: dict[str, TinyFamily], llama_oracle: PeftOracle) -> None:
    fam = families["llama"]
    # 14 blocks of 16 tokens for 8 requests of ~12 blocks each: sequences are preempted and recomputed,
    # starting again from the blocks they (or the others) left in the cache.
    engine = make_engine(fam, num_kv_blocks=14, max_num_seqs=8, max_num_batched_tokens=64)
    identities: list[str | None] = [None, "qv-r4", "all-r64", None]
    requests = [(f"{SYSTEM} {q}", identities[i % 4]) for i, q in enumerate(random_prompts(8, 9, 1, 4))]
    try:
        got = asyncio.run(run_requests(engine, requests, 2 * NEW_TOKENS))
        for (prompt, adapter), tokens in zip(requests, got):
            assert tokens == llama_oracle.greedy(prompt, adapter, 2 * NEW_TOKENS), f"{adapter}: {prompt!r}"
        stats = engine.stats()
        assert stats.preemptions > 0 and stats.prefix_cache["hits"] > 0
        engine.check_idle_invariants()

        async def abort_after_first_token() -> None:
            params = SamplingParams(max_new_tokens=30, ignore_eos=True)
            stream = engine.generate(f"{SYSTEM} then stop", params, "qv-r4")
            async for _ in stream:
                break
            await stream.aclose()  # the client went away: the request is aborted

        asyncio.run(abort_after_first_token())
        for _ in range(200):  # the abort lands at the next step
            if engine.stats().num_running == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        engine.check_idle_invariants()
        before = cache_hits(engine)
        tokens = asyncio.run(run_requests(engine, [(f"{SYSTEM} then stop", "qv-r4")], NEW_TOKENS))[0]
        assert cache_hits(engine) > before  # the aborted request's prompt blocks were kept
        assert tokens == llama_oracle.greedy(f"{SYSTEM} then stop", "qv-r4", NEW_TOKENS)
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_a_full_hit_recomputes_only_the_last_prompt_token(families: dict[str, TinyFamily]) -> None:
    engine = make_engine(families["llama"])
    prompt = [1, *random.Random(4).choices(range(8, 400), k=3 * BLOCK_SIZE)]  # 3 full blocks + 1 token
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    try:
        first = asyncio.run(engine.complete(prompt, params, "all-r64"))
        before = engine.stats()
        second = asyncio.run(engine.complete(prompt, params, "all-r64"))
        after = engine.stats()
        assert second.token_ids == first.token_ids
        assert after.prefix_cache["hits"] - before.prefix_cache["hits"] == 3 * BLOCK_SIZE
        # one model position for the prompt (its last token, giving the first sample), then 5 decodes
        computed = (after.prefill_tokens + after.decode_tokens) - (before.prefill_tokens + before.decode_tokens)
        assert computed == 1 + 5
        engine.check_idle_invariants()
    finally:
        engine.shutdown()


def test_a_reload_racing_a_new_pin_is_refused(families: dict[str, TinyFamily], monkeypatch: pytest.MonkeyPatch) -> None:
    """A request pinning the adapter while its files are re-read: the reload is refused, nothing changes."""
    engine = make_engine(families["llama"])
    pool = engine.pool
    try:
        asyncio.run(run_requests(engine, [("warm the slot", "qv-r4")], 2))
        identity = pool.cache_identity("qv-r4")
        read = adapter_reader.load_peft_adapter
        pins: list[int | None] = []

        def read_while_a_request_starts(*args: Any, **kwargs: Any) -> LoraAdapter:
            adapter = read(*args, **kwargs)
            pins.append(pool.acquire("qv-r4"))
            return replace(adapter, weights_digest="changed on disk")

        monkeypatch.setattr(adapter_reader, "load_peft_adapter", read_while_a_request_starts)
        with pytest.raises(AdapterBusyError, match="in use by 1 running"):
            engine.reload_adapter("qv-r4")
        assert pins[0] is not None
        pool.release("qv-r4", pins[0])
        assert pool.cache_identity("qv-r4") == identity == pool.cache_identity("qv-r4", pins[0])
        engine.check_idle_invariants()
    finally:
        engine.shutdown()
