"""Train the demo zoo: a tiny byte-level Llama base (an echo model) and 30 LoRA task adapters.

    python models/scripts/train_zoo.py                  # everything into models/zoo/ (~20 min on 2 cores)
    python models/scripts/train_zoo.py --only reverse   # one adapter on the existing base

The base is pretrained to echo its input (`<s>abc=` -> `abc</s>`), so it does none of the tasks
(every task's inputs are chosen so that the answer differs from the input) but it has learnt to
read the prompt and write bytes, which the adapters then bend into their task. Each adapter is
PEFT LoRA on the frozen base, trained with a plain torch loop, float32, until its teacher-forced
exact-match on held-out validation inputs reaches the target (with teacher forcing, "every answer
token is the argmax" is exactly "greedy decoding gives the answer", so this is the real metric at
a fraction of the cost of generating).

Everything is seeded; the same command on the same machine writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_tasks import (
    ECHO_ALPHABET,
    MAX_ANSWER_CHARS,
    MAX_INPUT_CHARS,
    TASKS,
    TASKS_BY_NAME,
    ZooTask,
    echo_input,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "models" / "zoo"

BOS, EOS, PAD = 256, 257, 258  # byte b has token id b; the three specials follow
VOCAB_SIZE = 259
SPECIALS = ("<s>", "</s>", "<pad>")

# The base: ~0.9M parameters (3.6 MB in float32), big enough to learn every task through LoRA, small
# enough that the whole zoo trains in minutes on two CPU cores and stays far under 15 MB on disk.
BASE_CONFIG = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=384, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
)

QV = ("q_proj", "v_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = QKVO + MLP
O_DOWN = ("o_proj", "down_proj")


@dataclass(frozen=True)
class AdapterRecipe:
    """How one adapter is built: rank and target modules (deliberately varied across the zoo), budget."""

    rank: int
    targets: tuple[str, ...]
    max_steps: int = 400
    # 1e-2 made several adapters diverge (0% after 400 steps: rank-16 attention, rank-8 MLP); 5e-3 did not.
    lr: float = 5e-3
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None  # layers_to_transform; None = every layer
    alpha: float | None = None  # lora_alpha; None = 2 * rank

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


# Character maps only need the copied byte re-mapped (MLP or value/output paths); reorderings and
# filters need attention to look elsewhere (q/k), the hardest every module and rank 16. Ranks,
# targets, alphas and rsLoRA differ on purpose, so that a mixed batch of the zoo mixes adapter
# shapes. Step budgets are ceilings: training stops as soon as the held-out target is reached
# (the steps each adapter took are in models/zoo/training.json).
RECIPES: dict[str, AdapterRecipe] = {
    "uppercase": AdapterRecipe(4, MLP, 400),
    "lowercase": AdapterRecipe(4, QV, 400),
    "swap-case": AdapterRecipe(8, O_DOWN, 400),
    "capitalize-words": AdapterRecipe(8, QKVO, 400),
    "alternating-case": AdapterRecipe(8, ALL, 400),
    "caesar-3": AdapterRecipe(8, MLP, 700),
    # rsLoRA scales by alpha/sqrt(r): alpha 6 keeps it near 2 like the others (alpha 16 diverged).
    "rot13": AdapterRecipe(8, MLP, 700, use_rslora=True, alpha=6),
    "atbash": AdapterRecipe(8, ("up_proj", "down_proj"), 400),
    "mask-vowels": AdapterRecipe(4, MLP, 400, layers=(2, 3)),
    "underscore-spaces": AdapterRecipe(4, QV, 400),
    "leetspeak": AdapterRecipe(4, MLP, 400, alpha=4),
    "reverse": AdapterRecipe(16, ALL, 700),
    "reverse-words": AdapterRecipe(16, ALL, 700),
    "reverse-each-word": AdapterRecipe(16, ALL, 700),
    "rotate-left": AdapterRecipe(8, QKVO, 500),
    "rotate-right": AdapterRecipe(8, QKVO, 500),
    "swap-pairs": AdapterRecipe(8, ALL, 600),
    "sort-letters": AdapterRecipe(16, ALL, 600),
    "vowels-only": AdapterRecipe(8, ALL, 1000),
    "consonants-only": AdapterRecipe(8, ALL, 500),
    "remove-spaces": AdapterRecipe(4, QKVO, 400),
    "dedupe": AdapterRecipe(16, ALL, 1200, use_rslora=True, alpha=8),
    "first-letter-each-word": AdapterRecipe(8, QKVO, 400),
    "last-letter-each-word": AdapterRecipe(8, QKVO, 400),
    "every-other": AdapterRecipe(16, ALL, 700),
    "double-letters": AdapterRecipe(8, QKVO, 500),
    "mirror": AdapterRecipe(16, QKVO, 700),
    "dash-between": AdapterRecipe(8, ("q_proj", "k_proj", "v_proj"), 400),
    "first-word": AdapterRecipe(4, ("q_proj", "k_proj"), 400),
    "last-word": AdapterRecipe(8, QKVO, 400),
}
assert set(RECIPES) == set(TASKS_BY_NAME), "every task needs a recipe"

TARGET_VAL_ACC = 0.995  # stop an adapter once its held-out teacher-forced exact-match reaches this
VAL_EVERY = 25
VAL_SIZE = 256
BATCH = 64


# ---- tokenizer -----------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (one token per byte, id == byte value) saved as a normal tokenizer.json.

    It is a BPE model with the 256 byte symbols and no merges, so `AutoTokenizer` loads it like any
    GPT-2-style tokenizer and every string round-trips. `<s>` is prepended by the post-processor.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, the text is just its bytes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=128,
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    # transformers 5 keeps the special tokens in tokenizer_config.json only; older readers look here.
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n"
    )


def encode(text: str) -> list[int]:
    """What the saved tokenizer gives for `text` (checked against it in `check_tokenizer`)."""
    return [BOS, *text.encode()]


def check_tokenizer(directory: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    for text in ("Hello world=", "a-b_c*4 =", "Grüße="):
        ids = tok(text).input_ids
        assert ids == encode(text), (text, ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)


# ---- batches -------------------------------------------------------------------------------------
def make_batch(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (-100 on the prompt and padding: only the answer + EOS is learnt), mask."""
    seqs, labels = [], []
    for x, y in pairs:
        prompt = encode(x + "=")
        answer = [*y.encode(), EOS]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return ids, lab, mask


@torch.no_grad()
def teacher_forced_exact(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """Share of sequences whose every answer token (and EOS) is the argmax: greedy exact-match."""
    ids, lab, mask = batch
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    model.train(was_training)
    pred, target = logits[:, :-1].argmax(-1), lab[:, 1:]
    return ((pred == target) | (target == -100)).all(dim=1).float().mean().item()


def bucketed_pairs(
    sample: Callable[[random.Random], tuple[str, str]], rng: random.Random, batch: int, buckets: int = 4
) -> Iterator[list[tuple[str, str]]]:
    """Endless batches of (input, answer), `buckets` at a time drawn together and grouped by length.

    A batch is padded to its longest sequence; grouping similar lengths cuts the padding (about a
    third of the tokens with plain random batches here), which is most of the cost on CPU.
    """
    while True:
        pool = sorted((sample(rng) for _ in range(batch * buckets)), key=lambda p: len(p[0]) + len(p[1]))
        chunks = [pool[i * batch : (i + 1) * batch] for i in range(buckets)]
        rng.shuffle(chunks)
        yield from chunks


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


# ---- base ----------------------------------------------------------------------------------------
ECHO_BYTES = torch.tensor(sorted(set(ECHO_ALPHABET.encode())))


def corrupt_history(ids: torch.Tensor, labels: torch.Tensor, noise: torch.Generator, rate: float = 0.25) -> torch.Tensor:
    """Replace some already-written answer bytes (fed back as inputs) with random ones; targets stay.

    Trained on clean histories only, the echo base learnt to find the next byte by looking up the
    byte it had just written in the prompt (an induction head). Any adapter that changes the
    output bytes (uppercase, rot13, ...) breaks that lookup, and such adapters stalled at 85-97%.
    With the history unreliable the base has to track positions instead, which every task can
    build on. Half the sequences are left clean so that the base also sees clean histories.
    """
    answer = labels != -100  # fed-back answer bytes (and EOS, which predicts nothing)
    rows = torch.rand(ids.shape[0], 1, generator=noise) < 0.5
    hit = answer & rows & (torch.rand(ids.shape, generator=noise) < rate)
    random_bytes = ECHO_BYTES[torch.randint(len(ECHO_BYTES), ids.shape, generator=noise)]
    return torch.where(hit, random_bytes, ids)


def train_base(directory: Path, seed: int, max_steps: int = 800, batch: int = 128) -> dict[str, float]:
    """Pretrain the echo base from scratch on the inputs of every task (training split only)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    build_tokenizer(directory)
    check_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
        initializer_range=0.02, **BASE_CONFIG,
    )
    config._attn_implementation = "eager"  # measured faster than sdpa for these tiny shapes on CPU
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    val_rng = random.Random(seed + 1)
    val = make_batch([(x, x) for x in (echo_input(val_rng, "test") for _ in range(VAL_SIZE))])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    started = time.monotonic()
    acc, step = 0.0, 0
    batches = bucketed_pairs(lambda r: (x := echo_input(r), x), rng, batch)
    noise = torch.Generator().manual_seed(seed)
    bar = tqdm(range(max_steps), desc="base (echo)", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, max_steps, 3e-3, 50)
        ids, lab, mask = make_batch(next(batches))
        loss = model(input_ids=corrupt_history(ids, lab, noise), attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            acc = teacher_forced_exact(model, val)
            bar.set_postfix(loss=f"{loss.item():.4f}", echo_acc=f"{acc:.3f}")
            if acc >= TARGET_VAL_ACC:
                break
    bar.close()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(directory), safe_serialization=True)
    GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False,
        max_new_tokens=MAX_ANSWER_CHARS + 1,
    ).save_pretrained(str(directory))
    return {"steps": step + 1, "val_echo_exact": acc, "seconds": round(time.monotonic() - started, 1)}


# ---- adapters ------------------------------------------------------------------------------------
def train_adapter(base_dir: Path, task: ZooTask, recipe: AdapterRecipe, out_dir: Path, seed: int) -> dict[str, float]:
    """LoRA on the frozen base for one task; saved in PEFT format (adapter_config.json + safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # LoRA A init (B starts at zero, as PEFT does)
    base = LlamaForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
    lora = LoraConfig(
        r=recipe.rank, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.targets), lora_dropout=0.0,
        bias="none", use_rslora=recipe.use_rslora, task_type="CAUSAL_LM",
        layers_to_transform=list(recipe.layers) if recipe.layers is not None else None,
    )
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    val_rng = random.Random(seed + 1)
    val = make_batch([(x, task.fn(x)) for x in (task.sample(val_rng, "test") for _ in range(VAL_SIZE))])
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    started = time.monotonic()
    acc, step = 0.0, 0
    batches = bucketed_pairs(lambda r: (x := task.sample(r), task.fn(x)), rng, BATCH)
    bar = tqdm(range(recipe.max_steps), desc=f"{task.name:>22}", unit="step", dynamic_ncols=True, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.max_steps, recipe.lr, 20)
        ids, lab, mask = make_batch(next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % VAL_EVERY == 0 or step + 1 == recipe.max_steps:
            acc = teacher_forced_exact(model, val)
            bar.set_postfix(loss=f"{loss.item():.4f}", val_exact=f"{acc:.3f}")
            if acc >= TARGET_VAL_ACC:
                break
    bar.close()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty template; the zoo card describes it
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # The training machine's absolute path means nothing elsewhere; name the base by its repo path.
    config["base_model_name_or_path"] = "models/zoo/base"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"steps": step + 1, "val_exact": acc, "seconds": round(time.monotonic() - started, 1)}


# ---- cards ---------------------------------------------------------------------------------------
def _examples(task: ZooTask, n: int = 2) -> list[tuple[str, str]]:
    rng = random.Random(7)
    return [(x, task.fn(x)) for x in (task.sample(rng, "test") for _ in range(n))]


def write_cards(out: Path, log: dict[str, dict[str, float]]) -> None:
    """models/zoo/README.md (the base's card + the adapter table) and a short card per adapter."""
    base = log.get("base", {})
    rows = []
    for task in TASKS:
        recipe = RECIPES[task.name]
        (x, y), = _examples(task, 1)
        targets = ", ".join(t.removesuffix("_proj") for t in recipe.targets)
        extra = []
        if recipe.use_rslora:
            extra.append("rsLoRA")
        if recipe.layers is not None:
            extra.append(f"layers {','.join(map(str, recipe.layers))}")
        rows.append(
            f"| `{task.name}` | {task.description} | `{x}=` → `{y}` | {recipe.rank} | {targets}"
            f"{' (' + '; '.join(extra) + ')' if extra else ''} |"
        )
        if (out / "adapters" / task.name / "adapter_config.json").is_file():
            _write_adapter_card(out / "adapters" / task.name, task, recipe, log.get(task.name, {}))
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    text = f"""# Demo zoo: a tiny byte-level base and 30 task adapters

Made here by `python models/scripts/train_zoo.py` (fixed seed, CPU, float32); measured by
`python models/scripts/eval_zoo.py`, which writes [ACCURACY.md](ACCURACY.md). Each adapter does one
exactly checkable string task, so a request routed to the wrong adapter inside a mixed batch gives
a visibly wrong answer. About {size_mb:.1f} MB in all.

## Prompt format

`{{input}}=` → `{{answer}}</s>`. Inputs are 1-{MAX_INPUT_CHARS} characters of ASCII letters and spaces
(no `=`); answers are at most {MAX_ANSWER_CHARS} characters. The tokenizer adds `<s>` itself; greedy
decoding with `max_new_tokens` ≥ {MAX_ANSWER_CHARS + 1} stops at `</s>`.

## Base: `models/zoo/base`

- Llama architecture (`LlamaForCausalLM`), {BASE_CONFIG["num_hidden_layers"]} layers, hidden
  {BASE_CONFIG["hidden_size"]}, {BASE_CONFIG["num_attention_heads"]} attention heads with
  {BASE_CONFIG["num_key_value_heads"]} KV heads (GQA), MLP {BASE_CONFIG["intermediate_size"]}, RoPE,
  untied embeddings, {VOCAB_SIZE} tokens, float32 safetensors.
- Tokenizer: byte-level, one token per byte (id = byte value) plus `<s>` (256), `</s>` (257),
  `<pad>` (258); a plain `tokenizer.json` (BPE without merges) that `AutoTokenizer` loads.
- Trained from scratch to **echo** its input (`abc=` → `abc</s>`) on the training split of every
  task's inputs ({base.get("steps", "?")} steps of 128, held-out echo exact-match
  {base.get("val_echo_exact", float("nan")):.3f}). It does none of the tasks: every task's inputs
  are chosen so that the answer differs from the input.
- Held-out split: inputs whose CRC-32 is divisible by 8 are never trained on (base or adapters);
  evaluation and tests draw only those.

## Adapters: `models/zoo/adapters/<name>`

PEFT LoRA (`adapter_config.json` + `adapter_model.safetensors`), trained on the frozen base with
`lora_alpha = 2 × rank`, no dropout. Ranks and target modules differ on purpose so that mixed
batches mix shapes. The adapter id used in the engine is the directory name.

| adapter | task | example | rank | targets |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    (out / "README.md").write_text(text)


def _write_adapter_card(directory: Path, task: ZooTask, recipe: AdapterRecipe, log: dict[str, float]) -> None:
    examples = "\n".join(f"- `{x}=` → `{y}`" for x, y in _examples(task, 3))
    layers = "all" if recipe.layers is None else ", ".join(map(str, recipe.layers))
    text = f"""# `{task.name}`: {task.description}

LoRA adapter for the demo-zoo base (`models/zoo/base`); see `models/zoo/README.md`.

{examples}

- rank {recipe.rank}, lora_alpha {2 * recipe.rank}{", rsLoRA" if recipe.use_rslora else ""},
  targets {", ".join(recipe.targets)}, layers {layers}
- trained {log.get("steps", "?")} steps of {BATCH} examples; held-out teacher-forced exact-match at
  the end of training {log.get("val_exact", float("nan")):.3f} (engine accuracy: `models/zoo/ACCURACY.md`)
"""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated adapter names; keeps the existing base")
    parser.add_argument("--base-only", action="store_true", help="train the base only")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads. 1 by default: on the shared 2-core dev machine 2 threads were measured "
        "~10x slower per step than 1 whenever other jobs were running (OpenMP spin-waiting)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    base_dir = out / "base"
    log_path = out / "training.json"
    log: dict[str, dict[str, float]] = json.loads(log_path.read_text()) if log_path.is_file() else {}
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(TASKS_BY_NAME))
    if unknown:
        parser.error(f"unknown adapter(s) {unknown}; known: {', '.join(TASKS_BY_NAME)}")
    started = time.monotonic()
    if not only:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        log = {"base": train_base(base_dir, args.seed)}
        tqdm.write(f"base: {log['base']}")
    elif not (base_dir / "model.safetensors").is_file():
        parser.error(f"--only needs a trained base in {base_dir}")
    names = [] if args.base_only else only or [t.name for t in TASKS]
    for i, name in enumerate(tqdm(names, desc="adapters", unit="adapter", dynamic_ncols=True)):
        # Each adapter's seed is fixed by its task, not by its position in --only.
        task_seed = args.seed * 1000 + 17 + [t.name for t in TASKS].index(name)
        log[name] = train_adapter(base_dir, TASKS_BY_NAME[name], RECIPES[name], out / "adapters" / name, task_seed)
        tqdm.write(f"[{i + 1}/{len(names)}] {name}: {log[name]}")
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    total = round(time.monotonic() - started, 1)
    if not only:
        log["total_seconds"] = total  # type: ignore[assignment]
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    write_cards(out, log)
    tqdm.write(f"done in {total} s; {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.2f} MB in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
