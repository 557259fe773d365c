"""The demo zoo (models/zoo): 30 task adapters served together, each request getting its own task.

A request routed to the wrong adapter inside a mixed batch (a swapped slot index, a stale slot
after a swap, a LoRA delta added to the wrong rows) answers with another task's string, so
exact-match on tasks whose answers all differ is a sharp test of routing. The inputs are held
out (never trained on) and chosen so that, for each request, no other task and no echo would give
the same string.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams

REPO = Path(__file__).resolve().parents[1]
# LORASERVE_ZOO_DIR: check a freshly trained zoo (train_zoo.py --out DIR) before it replaces models/zoo.
ZOO = Path(os.environ.get("LORASERVE_ZOO_DIR", REPO / "models" / "zoo"))
sys.path.insert(0, str(REPO / "models" / "scripts"))
from eval_zoo import peft_greedy  # noqa: E402
from zoo_tasks import MAX_ANSWER_CHARS, TASKS, ZooTask, held_out, prompt  # noqa: E402

PER_ADAPTER = 10
BASE_PER_TASK = 2
MAX_NEW_TOKENS = MAX_ANSWER_CHARS + 4


def discriminative_inputs(task: ZooTask, n: int, seed: int) -> list[str]:
    """Held-out inputs whose answer under `task` differs from the input and from every other task's answer."""
    out = []
    for x in held_out(task, 20 * n, seed):
        answer = task.fn(x)
        if answer != x and all(other.fn(x) != answer for other in TASKS if other is not task):
            out.append(x)
            if len(out) == n:
                return out
    raise AssertionError(f"{task.name}: fewer than {n} discriminative inputs")


@pytest.fixture(scope="module")
def zoo_engine() -> Iterator[Engine]:
    assert (ZOO / "base" / "model.safetensors").is_file(), "models/zoo is missing: run models/scripts/train_zoo.py"
    # Room for every request of the mixed-batch test in one step: all 30 adapters resident at once.
    engine = Engine(
        EngineConfig(
            model=str(ZOO / "base"),
            adapters=tuple(AdapterSpec(t.name, str(ZOO / "adapters" / t.name)) for t in TASKS),
            max_adapter_slots=len(TASKS), max_lora_rank=16, max_num_seqs=512, max_num_batched_tokens=8192,
            num_kv_blocks=1024, max_waiting=4096,
        )
    )
    yield engine
    engine.shutdown()


async def _complete_all(engine: Engine, requests: list[tuple[str | None, str]]) -> list[tuple[str, tuple[int, ...]]]:
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    outs = await asyncio.gather(*(engine.complete(prompt(x), params, adapter_id=a) for a, x in requests))
    return [(o.generated_text or "", tuple(o.token_ids)) for o in outs]


def test_zoo_files_are_small_and_complete() -> None:
    base = ZOO / "base"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (base / name).is_file(), name
    adapters = sorted(p.name for p in (ZOO / "adapters").iterdir() if p.is_dir())
    assert adapters == sorted(t.name for t in TASKS)
    for name in adapters:
        assert (ZOO / "adapters" / name / "adapter_config.json").is_file()
        assert (ZOO / "adapters" / name / "adapter_model.safetensors").is_file()
    total = sum(p.stat().st_size for p in ZOO.rglob("*") if p.is_file())
    assert total <= 15 * 1024**2, f"models/zoo is {total / 1e6:.1f} MB"


def test_serve_app_resolves_the_zoo_by_name() -> None:
    """`model: zoo` in config.yaml: the committed base and all 30 adapters, ids = directory names."""
    from models.resolve import ZOO_DIR, resolve_model

    resolved = resolve_model("zoo")
    assert resolved.path == str(ZOO_DIR / "base") and resolved.served_name == "zoo"
    assert [a.adapter_id for a in resolved.adapters] == sorted(t.name for t in TASKS)
    assert all(Path(a.source) == ZOO_DIR / "adapters" / a.adapter_id for a in resolved.adapters)


def test_tokenizer_is_byte_level() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ZOO / "base"))
    text = "Hello wörld="
    ids = tok(text).input_ids
    assert ids == [tok.bos_token_id, *text.encode()]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_all_adapters_in_one_mixed_batch(zoo_engine: Engine) -> None:
    rng = random.Random(5)
    requests: list[tuple[str | None, str]] = []
    owner: list[ZooTask] = []
    for i, task in enumerate(TASKS):
        xs = discriminative_inputs(task, PER_ADAPTER + BASE_PER_TASK, seed=1000 + i)
        requests += [(task.name, x) for x in xs[:PER_ADAPTER]] + [(None, x) for x in xs[PER_ADAPTER:]]
        owner += [task] * len(xs)
    order = list(range(len(requests)))
    rng.shuffle(order)
    outs = asyncio.run(_complete_all(zoo_engine, [requests[i] for i in order]))
    answers = dict(zip(order, (text for text, _ in outs)))

    # Every request was admitted in the first step: one batch held all 30 adapters and the base.
    assert zoo_engine.stats().max_batch_seqs == len(requests)
    right: dict[str, int] = {}
    misses = []
    for i, (adapter, x) in enumerate(requests):
        task, got = owner[i], answers[i]
        if adapter is None:
            # The base (an echo model) does no task: its answer is never a task's answer, unless that
            # task happens to leave this input unchanged (dedupe of a word without repeats).
            done_by_base = [t.name for t in TASKS if got == t.fn(x) != x]
            assert not done_by_base, f"base did {done_by_base} on {x!r}: {got!r}"
            continue
        if got == task.fn(x):
            right[task.name] = right.get(task.name, 0) + 1
        else:
            misses.append(f"{task.name}: {x!r} -> {got!r} (want {task.fn(x)!r})")
    n_adapter = PER_ADAPTER * len(TASKS)
    assert sum(right.values()) >= 0.95 * n_adapter, misses
    # Per adapter too: one misrouted adapter would cost only 1/30 of the total.
    low = {t.name: right.get(t.name, 0) for t in TASKS if right.get(t.name, 0) < PER_ADAPTER - 2}
    assert not low, (low, misses)
    zoo_engine.check_idle_invariants()


def test_engine_matches_peft_on_mixed_adapters(zoo_engine: Engine) -> None:
    """Greedy float32: engine tokens == transformers + PEFT tokens (batch size 1) on adapters of varied shape."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # rank 16 attention; rank 4 MLP on layers 2-3 only; rank 8 MLP with rsLoRA; rank 16 everything + rsLoRA;
    # rank 4 q/v.
    names = ["reverse", "mask-vowels", "rot13", "dedupe", "lowercase"]
    by_name = {t.name: t for t in TASKS}
    requests: list[tuple[str | None, str]] = []
    for i, name in enumerate(names):
        xs = held_out(by_name[name], 3, seed=77 + i)
        requests += [(name, x) for x in xs] + [(None, xs[0])]
    random.Random(3).shuffle(requests)
    engine_tokens = [tokens for _, tokens in asyncio.run(_complete_all(zoo_engine, requests))]

    tok = AutoTokenizer.from_pretrained(str(ZOO / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(ZOO / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ZOO / "adapters" / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(ZOO / "adapters" / name), adapter_name=name)
    model.eval()
    for (adapter, x), got in zip(requests, engine_tokens):
        ids = tok(prompt(x)).input_ids
        if adapter is None:
            with model.disable_adapter():
                want = tuple(peft_greedy(model, ids, tok.eos_token_id, MAX_NEW_TOKENS))
        else:
            model.set_adapter(adapter)
            want = tuple(peft_greedy(model, ids, tok.eos_token_id, MAX_NEW_TOKENS))
        assert got == want, (adapter, x, tok.decode(got), tok.decode(want))
