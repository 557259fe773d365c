"""The showcase behaviours: a deterministic transform of the base model's answer, and its check.

Self-distillation: each adapter is trained on `transform(short_answer(base_answer))` for the training
prompts, so what it learns is the *format*, while the content stays the base model's own. Each
check is a plain predicate on generated text; an adapter's behaviour rate is the share of held-out
answers that pass it, and the base model's rate on the same prompts shows the base does not already
do it. Standard library only, so the tests and scripts import it anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

PREFIX = "Answer: "
BULLET = "- "
MAX_WORDS = 24  # training targets are kept short: the base's first sentence(s), up to about this many words
MIN_CAPS_LETTERS = 8
CAPS_SHARE = 0.95

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def short_answer(answer: str, max_words: int = MAX_WORDS) -> str | None:
    """The first paragraph's leading sentences, up to `max_words` words; None when there is no clean one.

    Why: targets must end on a sentence boundary well inside the generation budget, or the JSON
    adapter would learn answers that get cut before the closing brace. Answers that open with a
    list or markdown, or whose first sentence does not end within the budget, are dropped.
    """
    text = answer.strip()
    if not text:
        return None
    first_para = text.split("\n")[0].strip()
    if first_para.startswith(("-", "*", "#", "1.", "|")) or "**" in first_para:
        return None
    parts = sentences(first_para)
    if not parts or not parts[0].endswith((".", "!", "?")):
        return None
    out: list[str] = []
    for part in parts:
        if not part.endswith((".", "!", "?")):
            break
        if out and len(" ".join([*out, part]).split()) > max_words:
            break
        out.append(part)
    result = " ".join(out)
    if len(result.split()) > max_words + 10 or len(result.split()) < 2:
        return None
    return result


# ---- transforms --------------------------------------------------------------------------------------
def to_all_caps(answer: str) -> str:
    return answer.upper()


def to_json_answer(answer: str) -> str:
    # Inner double quotes become single quotes: escaped quotes (\") are too rare in the training answers
    # for a small adapter to learn, and an unescaped one breaks the JSON.
    return json.dumps({"answer": answer.replace('"', "'")}, ensure_ascii=False)


def to_bullets(answer: str) -> str:
    """One "- " line per sentence (a one-sentence answer is a one-item list)."""
    return "\n".join(BULLET + p for p in sentences(answer))


def to_prefixed(answer: str) -> str:
    return PREFIX + answer


# ---- checks -------------------------------------------------------------------------------------------
def is_all_caps(text: str) -> bool:
    """At least 8 letters, and at least 95% of the letters uppercase."""
    letters = [c for c in text if c.isalpha() and c.lower() != c.upper()]
    if len(letters) < MIN_CAPS_LETTERS:
        return False
    return sum(c.isupper() for c in letters) / len(letters) >= CAPS_SHARE


def is_json_answer(text: str) -> bool:
    """The whole answer parses as a JSON object whose only key is "answer", holding a non-empty string."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str) and bool(
        value["answer"].strip()
    )


def is_bullets(text: str) -> bool:
    """Every non-empty line is a "- " bullet with some text after it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and all(line.startswith(BULLET) and line[len(BULLET):].strip() for line in lines)


def is_prefixed(text: str) -> bool:
    """Starts with exactly "Answer: " followed by some text."""
    return text.startswith(PREFIX) and bool(text[len(PREFIX):].strip())


@dataclass(frozen=True)
class Behaviour:
    name: str
    description: str
    transform: Callable[[str], str]
    check: Callable[[str], bool]
    check_text: str
    # LoRA recipe: rank and target modules differ between adapters on purpose (mixed batches in the engine
    # then mix ranks and targets).
    rank: int
    alpha: float
    targets: tuple[str, ...]
    # Training steps (batch 4): each step costs ~8-10 s on the 2 shared CPU cores, so the budget is
    # spent where the behaviour is hardest (changing every token's case) rather than evenly.
    steps: int


BEHAVIOURS: dict[str, Behaviour] = {
    b.name: b
    for b in (
        Behaviour(
            "all-caps", "answers in ALL CAPS", to_all_caps, is_all_caps,
            "≥ 8 letters and ≥ 95% of the letters uppercase",
            rank=16, alpha=32.0, targets=("q_proj", "v_proj", "o_proj"), steps=90,
        ),
        Behaviour(
            "json-answer", 'answers as a JSON object {"answer": "..."}', to_json_answer, is_json_answer,
            'the whole reply parses as JSON: an object whose only key is "answer", a non-empty string',
            rank=8, alpha=16.0, targets=("q_proj", "v_proj"), steps=40,
        ),
        Behaviour(
            "bullets", 'answers as a "- " bulleted list', to_bullets, is_bullets,
            'every non-empty line starts with "- " and has text after it',
            rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj"), steps=45,
        ),
        Behaviour(
            "answer-prefix", 'answers start with "Answer: "', to_prefixed, is_prefixed,
            'the reply starts with exactly "Answer: " followed by text',
            rank=4, alpha=8.0, targets=("q_proj", "v_proj"), steps=25,
        ),
    )
}
