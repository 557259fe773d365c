"""Measure the demo zoo through the engine and write models/zoo/ACCURACY.md.

    python models/scripts/eval_zoo.py                    # 200 held-out inputs per task, PEFT on all
    python models/scripts/eval_zoo.py --peft-per-task 20 # PEFT cross-check on a subset (faster)

For every task: 200 held-out inputs (never trained on), sent through the engine with the task's
adapter and with no adapter (the base), all 12,000 requests submitted at once so that every
adapter and the base are decoded together in mixed batches; greedy, float32. Then the same
requests through transformers + PEFT (batch size 1, greedy) and a token-by-token comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_tasks import MAX_ANSWER_CHARS, TASKS, ZooTask, held_out, prompt

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ZOO = REPO / "models" / "zoo"
EVAL_SEED = 2024
# A little room past the longest right answer, so a wrong answer that runs on is still compared.
MAX_NEW_TOKENS = MAX_ANSWER_CHARS + 8
BASE = ""  # adapter key of the no-adapter requests in the result tables


@dataclass
class Result:
    task: str
    adapter: str  # task name, or BASE
    input: str
    token_ids: tuple[int, ...]
    text: str


def zoo_engine(zoo: Path, **overrides: int) -> object:
    """An engine serving the zoo base with all 30 adapters, sized so that they all fit one batch."""
    sys.path.insert(0, str(REPO))
    from engine import AdapterSpec, Engine, EngineConfig

    config = dict(
        max_adapter_slots=len(TASKS), max_lora_rank=16, max_num_seqs=512, max_num_batched_tokens=16384,
        num_kv_blocks=4096, max_waiting=100_000, max_queue_wait_s=None,  # offline batch: no queue deadline
    )
    config.update(overrides)
    adapters = tuple(AdapterSpec(t.name, str(zoo / "adapters" / t.name)) for t in TASKS)
    return Engine(EngineConfig(model=str(zoo / "base"), adapters=adapters, **config))  # type: ignore[arg-type]


async def run_engine(engine: object, requests: list[tuple[ZooTask, str, str]]) -> list[Result]:
    """All requests at once (asyncio.gather): the scheduler mixes adapters and the base in each step."""
    from engine import SamplingParams

    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    bar = tqdm(total=len(requests), desc="engine", unit="req", dynamic_ncols=True)

    async def one(task: ZooTask, adapter: str, x: str) -> Result:
        out = await engine.complete(prompt(x), params, adapter_id=adapter or None)  # type: ignore[attr-defined]
        bar.update()
        return Result(task.name, adapter, x, tuple(out.token_ids), out.generated_text or "")

    try:
        return list(await asyncio.gather(*(one(t, a, x) for t, a, x in requests)))
    finally:
        bar.close()


def peft_model(zoo: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(zoo / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(zoo / "adapters" / TASKS[0].name), adapter_name=TASKS[0].name)
    for task in TASKS[1:]:
        model.load_adapter(str(zoo / "adapters" / task.name), adapter_name=task.name)
    return model.eval()


@torch.no_grad()
def peft_greedy(model: torch.nn.Module, ids: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Batch size 1 greedy decoding with the KV cache; the output ends with EOS if one was produced."""
    out: list[int] = []
    past = None
    step_ids = torch.tensor([ids])
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = res.past_key_values
        token = int(res.logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        step_ids = torch.tensor([[token]])
    return out


def run_peft(zoo: Path, results: list[Result], per_task: int) -> dict[tuple[str, str], tuple[int, int]]:
    """(task, adapter) -> (agreeing, compared) for the first `per_task` inputs of each task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo / "base"))
    model = peft_model(zoo)
    seen: dict[tuple[str, str], int] = {}
    todo = []
    for r in results:
        key = (r.task, r.adapter)
        if seen.get(key, 0) < per_task:
            seen[key] = seen.get(key, 0) + 1
            todo.append(r)
    agree: dict[tuple[str, str], tuple[int, int]] = {}
    for r in tqdm(todo, desc="peft (bs 1)", unit="req", dynamic_ncols=True):
        ids = tokenizer(prompt(r.input)).input_ids
        if r.adapter:
            model.set_adapter(r.adapter)
            tokens = peft_greedy(model, ids, tokenizer.eos_token_id, MAX_NEW_TOKENS)
        else:
            with model.disable_adapter():
                tokens = peft_greedy(model, ids, tokenizer.eos_token_id, MAX_NEW_TOKENS)
        ok, n = agree.get((r.task, r.adapter), (0, 0))
        agree[(r.task, r.adapter)] = (ok + (tuple(tokens) == r.token_ids), n + 1)
    return agree


def write_report(
    path: Path, results: list[Result], agree: dict[tuple[str, str], tuple[int, int]], n: int, per_task: int,
    engine_seconds: float, batch_stats: dict[str, object],
) -> tuple[float, float, float]:
    by_key: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_key.setdefault((r.task, r.adapter), []).append(r)
    fns = {t.name: t.fn for t in TASKS}

    def exact(rs: list[Result]) -> float:
        return sum(r.text == fns[r.task](r.input) for r in rs) / len(rs)

    rows = []
    adapter_accs, base_accs = [], []
    total_ok = total_n = 0
    for task in TASKS:
        rs, base_rs = by_key[(task.name, task.name)], by_key[(task.name, BASE)]
        acc, base_acc = exact(rs), exact(base_rs)
        adapter_accs.append(acc)
        base_accs.append(base_acc)
        a_ok, a_n = agree.get((task.name, task.name), (0, 0))
        b_ok, b_n = agree.get((task.name, BASE), (0, 0))
        total_ok += a_ok + b_ok
        total_n += a_n + b_n
        wrong = next((r for r in rs if r.text != task.fn(r.input)), None)
        miss = f"`{wrong.input}=` → `{wrong.text}` (want `{task.fn(wrong.input)}`)" if wrong else ""
        rows.append(
            f"| `{task.name}` | {acc:.1%} | {base_acc:.1%} | {a_ok}/{a_n} | {b_ok}/{b_n} | {miss} |"
        )
    subset = "all" if per_task >= n else f"the first {per_task} of the {n}"
    agreement = total_ok / total_n if total_n else float("nan")
    text = f"""# Demo zoo accuracy

Written by `python models/scripts/eval_zoo.py` (greedy, float32, CPU). For each of the 30 tasks,
{n} held-out inputs (never seen in training; seed {EVAL_SEED}) go through the **engine** twice:
with the task's adapter and with no adapter (the base). All {len(results)} requests were submitted
at once, so adapters and the base were decoded together in mixed batches (largest batch:
{batch_stats.get("max_batch_seqs")} sequences; engine wall time {engine_seconds:.0f} s).
"Exact" means the generated text (up to `</s>`, at most {MAX_NEW_TOKENS} new tokens) equals the
task's answer.

The PEFT columns repeat {subset} inputs of each task through transformers + PEFT (batch size 1,
greedy, KV cache) and count requests whose generated token ids equal the engine's exactly.

**Summary:** adapter exact-match {min(adapter_accs):.1%} – {max(adapter_accs):.1%} (bar ≥ 95%);
base exact-match at most {max(base_accs):.1%} on any task (bar ≤ 5%); engine = PEFT on
{total_ok}/{total_n} requests ({agreement:.1%}).

| adapter | engine exact (adapter) | engine exact (base, same inputs) | engine = PEFT (adapter) | engine = PEFT (base) | first miss |
| --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}
"""
    path.write_text(text)
    return min(adapter_accs), max(base_accs), agreement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO)
    parser.add_argument("--n", type=int, default=200, help="held-out inputs per task")
    parser.add_argument("--peft-per-task", type=int, default=200, help="inputs per task cross-checked with PEFT")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see train_zoo.py --threads)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    requests = []
    for task in TASKS:
        for x in held_out(task, args.n, EVAL_SEED):
            requests.append((task, task.name, x))
            requests.append((task, BASE, x))
    # Interleave tasks (a seeded shuffle) so the queue is a real mix, not 30 runs of one adapter.
    import random

    random.Random(EVAL_SEED).shuffle(requests)
    engine = zoo_engine(args.zoo)
    started = time.monotonic()
    try:
        results = asyncio.run(run_engine(engine, requests))
        engine_seconds = time.monotonic() - started
        stats = engine.stats().as_dict()  # type: ignore[attr-defined]
    finally:
        engine.shutdown()  # type: ignore[attr-defined]
    agree = run_peft(args.zoo, results, args.peft_per_task) if args.peft_per_task > 0 else {}
    worst, base_best, agreement = write_report(
        args.zoo / "ACCURACY.md", results, agree, args.n, args.peft_per_task, engine_seconds, stats
    )
    print(f"adapter exact min {worst:.3f}; base exact max {base_best:.3f}; engine = PEFT {agreement:.4f}")
    print(f"wrote {args.zoo / 'ACCURACY.md'}")
    return 0 if worst >= 0.95 and base_best <= 0.05 and agreement == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
