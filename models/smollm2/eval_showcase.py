"""Measure each showcase adapter's behaviour rate on the held-out prompts, and the base model's; write EVAL.md.

    python models/smollm2/eval_showcase.py            # all held-out prompts (78), about 10 min on 2 CPU cores
    python models/smollm2/eval_showcase.py --limit 12 --no-write

Every (prompt, adapter) pair and every base request go through the engine together, greedy, in one
mixed-adapter batch stream. An adapter passes with a rate >= 90%; the base model, answering the
same prompts with the same token budget, must stay <= 10% on every check (it does not already do it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from behaviours import BEHAVIOURS
from common import HERE, MAX_NEW_TOKENS, adapter_dirs, generate_all, make_engine
from prompts import heldout_prompts

ADAPTER_BAR = 0.90
BASE_BAR = 0.10


def evaluate(model_dir: Path, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
             progress: bool = False) -> dict[str, Any]:
    """Rates and raw answers: {"rates": {name: (adapter_rate, base_rate)}, "answers": {name|"base": [...]}}."""
    adapters = adapter_dirs()
    missing = sorted(set(BEHAVIOURS) - set(adapters))
    if missing:
        raise FileNotFoundError(f"showcase adapters missing under {HERE / 'adapters'}: {missing}")
    engine = make_engine(model_dir, {name: adapters[name] for name in BEHAVIOURS})
    try:
        names: list[str | None] = [None, *BEHAVIOURS]
        pairs = [(q, name) for name in names for q in questions]
        started = time.monotonic()
        texts = generate_all(engine, [q for q, _ in pairs], [a for _, a in pairs], max_new_tokens, progress)
        seconds = time.monotonic() - started
        stats = engine.stats()
    finally:
        engine.shutdown()
    answers: dict[str, list[str]] = {}
    for (_, name), text in zip(pairs, texts, strict=True):
        answers.setdefault(name or "base", []).append(text)
    rates = {}
    for name, behaviour in BEHAVIOURS.items():
        adapter_rate = sum(map(behaviour.check, answers[name])) / len(questions)
        base_rate = sum(map(behaviour.check, answers["base"])) / len(questions)
        rates[name] = (adapter_rate, base_rate)
    return {"rates": rates, "answers": answers, "seconds": seconds, "requests": len(pairs),
            "max_batch_seqs": stats.max_batch_seqs}


def write_report(result: dict[str, Any], questions: list[str], path: Path) -> None:
    lines = [
        "# SmolLM2-135M-Instruct showcase adapters: held-out behaviour rates",
        "",
        f"Written by `python models/smollm2/eval_showcase.py`. {len(questions)} held-out prompts "
        "(`prompts.heldout_prompts()`: subjects never seen in training), chat template with the default system "
        f"prompt, greedy, float32, at most {MAX_NEW_TOKENS} new tokens, through the engine: all "
        f"{result['requests']} requests (each prompt for the base and for every adapter) in flight together, "
        f"up to {result['max_batch_seqs']} sequences per mixed-adapter batch; {result['seconds']:.0f} s on 2 CPU cores.",
        "",
        f"Bars: adapter ≥ {ADAPTER_BAR:.0%}, base ≤ {BASE_BAR:.0%} on the same prompts.",
        "",
        "| adapter | behaviour | check | adapter rate | base rate | pass |",
        "| --- | --- | --- | ---: | ---: | :---: |",
    ]
    for name, (a, b) in result["rates"].items():
        beh = BEHAVIOURS[name]
        ok = "yes" if a >= ADAPTER_BAR and b <= BASE_BAR else "**no**"
        lines.append(f"| `{name}` | {beh.description} | {beh.check_text} | {a:.1%} | {b:.1%} | {ok} |")
    lines += ["", "## Examples (first three held-out prompts)", ""]
    for i, q in enumerate(questions[:3]):
        lines.append(f"**{q}**")
        lines.append("")
        for name in ["base", *BEHAVIOURS]:
            text = result["answers"][name][i]
            lines.append(f"- `{name}`: {json.dumps(text, ensure_ascii=False)}")
        lines.append("")
    failures = []
    for name, behaviour in BEHAVIOURS.items():
        for q, text in zip(questions, result["answers"][name], strict=True):
            if not behaviour.check(text):
                failures.append(f"- `{name}` on {json.dumps(q)}: {json.dumps(text, ensure_ascii=False)}")
    lines += ["## Adapter answers that fail their check", ""]
    lines += failures or ["(none)"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    parser.add_argument("--no-write", action="store_true", help="print the rates, do not write EVAL.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from models.gguf_convert import ensure_smollm2

    questions = heldout_prompts()[: args.limit]
    result = evaluate(ensure_smollm2(), questions, progress=True)
    ok = True
    for name, (a, b) in result["rates"].items():
        passed = a >= ADAPTER_BAR and b <= BASE_BAR
        ok &= passed
        print(f"{name:14s} adapter {a:6.1%}  base {b:6.1%}  {'ok' if passed else 'FAIL'}")
    print(f"{result['requests']} requests in {result['seconds']:.0f} s")
    if not args.no_write:
        write_report(result, questions, HERE / "EVAL.md")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
