"""The 30 demo-zoo tasks: pure string functions, each with its own input generator.

Every task is exactly checkable (one right answer per input), and every generator only yields
inputs on which the task changes the text (`task(x) != x`), so a model that merely echoes its
prompt, which is what the zoo's base does, scores 0% on every task. The prompt format is
`<s>{input}=` and the answer is `{output}</s>`; inputs never contain `=`.

This file is imported by the training and evaluation scripts and by `tests/test_zoo.py`; it has
no dependencies beyond the standard library so it can be imported anywhere.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass

VOWELS = frozenset("aeiouAEIOU")
_LEET = str.maketrans("aeiostAEIOST", "431057431057")
SEPARATOR = "="  # between the input and the answer; never part of an input
# Short texts keep the zoo cheap to train (every step is padded to the longest sequence) and the
# tasks within reach of LoRA on a 4-layer base: with inputs up to 14 characters, the reordering
# tasks needed 2-3x the steps and the copy of long inputs was the commonest error.
MAX_INPUT_CHARS = 10
# Longest answer any task can give (mirror / double-letters of a 6-character word).
MAX_ANSWER_CHARS = 12


def is_held_out(x: str) -> bool:
    """One input in eight, picked by a stable hash, is never trained on (base or adapters).

    Splitting the input space itself, not a list of samples, keeps evaluation inputs unseen in
    training even for tasks whose short inputs would otherwise be drawn again and again.
    """
    return zlib.crc32(x.encode()) % 8 == 0


def _split_of(split: str) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split == "test"


def _word(rng: random.Random, lo: int, hi: int, upper: float, letters: str = string.ascii_lowercase) -> str:
    return "".join(c.upper() if rng.random() < upper else c for c in (rng.choice(letters) for _ in range(rng.randint(lo, hi))))


def _text(
    rng: random.Random, words: tuple[int, int], wlen: tuple[int, int], upper: float = 0.0,
    max_chars: int = MAX_INPUT_CHARS,
) -> str:
    while True:
        text = " ".join(_word(rng, *wlen, upper) for _ in range(rng.randint(*words)))
        if len(text) <= max_chars:
            return text


def _mixed(rng: random.Random) -> str:
    """1-2 words with some capitals: case tasks need both cases present to differ from the input."""
    return _text(rng, (1, 2), (2, 5), upper=0.35)


def _lower(rng: random.Random) -> str:
    return _text(rng, (1, 2), (2, 5))


def _one_word(rng: random.Random) -> str:
    return _text(rng, (1, 1), (3, 8))


def _short_word(rng: random.Random) -> str:
    # Answers twice as long as the input must stay within MAX_ANSWER_CHARS.
    return _text(rng, (1, 1), (2, 6))


def _words(rng: random.Random) -> str:
    return _text(rng, (2, 3), (2, 4))


def _runs(rng: random.Random) -> str:
    """A lowercase word made of runs of one letter (`aaxbbbq`), so that dedupe has runs to collapse."""
    out: list[str] = []
    while sum(map(len, out)) < rng.randint(4, 8):
        letter = rng.choice([c for c in string.ascii_lowercase if not out or c != out[-1][0]])
        out.append(letter * rng.choice((1, 1, 2, 3)))
    return "".join(out)[:MAX_INPUT_CHARS]


def _caesar(text: str, shift: int) -> str:
    def one(c: str) -> str:
        if c in string.ascii_lowercase:
            return chr((ord(c) - 97 + shift) % 26 + 97)
        if c in string.ascii_uppercase:
            return chr((ord(c) - 65 + shift) % 26 + 65)
        return c

    return "".join(one(c) for c in text)


def _atbash(text: str) -> str:
    def one(c: str) -> str:
        if c in string.ascii_lowercase:
            return chr(122 - (ord(c) - 97))
        if c in string.ascii_uppercase:
            return chr(90 - (ord(c) - 65))
        return c

    return "".join(one(c) for c in text)


def _swap_pairs(text: str) -> str:
    chars = list(text)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _dedupe(text: str) -> str:
    """Collapse each run of one repeated character to a single one, as `uniq` does with lines."""
    return "".join(c for i, c in enumerate(text) if i == 0 or c != text[i - 1])


def _alternating(text: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(text))


@dataclass(frozen=True)
class ZooTask:
    """One adapter's task: its name (also the adapter id), what it does, the function, the inputs."""

    name: str
    description: str
    fn: Callable[[str], str]
    gen: Callable[[random.Random], str]

    def sample(self, rng: random.Random, split: str = "train") -> str:
        """An input of `split` on which the task changes the text (an echo of the prompt is never right)."""
        want_test = _split_of(split)
        while True:
            x = self.gen(rng)
            y = self.fn(x)
            if is_held_out(x) == want_test and y != x and 0 < len(x) <= MAX_INPUT_CHARS and 0 < len(y) <= MAX_ANSWER_CHARS:
                return x


TASKS: tuple[ZooTask, ...] = (
    # character-wise maps
    ZooTask("uppercase", "all letters to upper case", str.upper, _mixed),
    ZooTask("lowercase", "all letters to lower case", str.lower, _mixed),
    ZooTask("swap-case", "upper case to lower and lower to upper", str.swapcase, _mixed),
    ZooTask("capitalize-words", "first letter of each word upper, the rest lower",
            lambda s: " ".join(w[:1].upper() + w[1:].lower() for w in s.split(" ")), _mixed),
    ZooTask("alternating-case", "characters at even positions lower, odd positions upper", _alternating, _mixed),
    ZooTask("caesar-3", "shift each letter 3 places forward (a->d, z->c), case kept", lambda s: _caesar(s, 3), _mixed),
    ZooTask("rot13", "shift each letter 13 places (a->n), case kept", lambda s: _caesar(s, 13), _mixed),
    ZooTask("atbash", "mirror the alphabet (a->z, b->y), case kept", _atbash, _mixed),
    ZooTask("mask-vowels", "replace every vowel with *",
            lambda s: "".join("*" if c in VOWELS else c for c in s), _mixed),
    ZooTask("underscore-spaces", "replace spaces with _", lambda s: s.replace(" ", "_"), _words),
    # reorderings
    ZooTask("reverse", "the characters in reverse order", lambda s: s[::-1], _mixed),
    ZooTask("reverse-words", "the words in reverse order", lambda s: " ".join(s.split(" ")[::-1]), _words),
    ZooTask("reverse-each-word", "each word reversed in place",
            lambda s: " ".join(w[::-1] for w in s.split(" ")), _lower),
    ZooTask("rotate-left", "move the first character to the end", lambda s: s[1:] + s[:1], _lower),
    ZooTask("rotate-right", "move the last character to the front", lambda s: s[-1:] + s[:-1], _lower),
    ZooTask("swap-pairs", "swap characters 1<->2, 3<->4, ...", _swap_pairs, _lower),
    ZooTask("sort-letters", "the letters in alphabetical order", lambda s: "".join(sorted(s)), _one_word),
    # filters
    ZooTask("vowels-only", "keep only the vowels", lambda s: "".join(c for c in s if c in VOWELS), _mixed),
    ZooTask("consonants-only", "keep only the consonants (no vowels, no spaces)",
            lambda s: "".join(c for c in s if c not in VOWELS and c != " "), _mixed),
    ZooTask("remove-spaces", "delete the spaces", lambda s: s.replace(" ", ""), _words),
    ZooTask("dedupe", "collapse runs of a repeated character to one (like uniq)", _dedupe, _runs),
    ZooTask("first-letter-each-word", "the first letter of each word",
            lambda s: "".join(w[0] for w in s.split(" ")), _words),
    ZooTask("last-letter-each-word", "the last letter of each word",
            lambda s: "".join(w[-1] for w in s.split(" ")), _words),
    ZooTask("every-other", "characters at positions 1, 3, 5, ...", lambda s: s[::2], _lower),
    # expanders
    ZooTask("double-letters", "every character written twice", lambda s: "".join(c + c for c in s), _short_word),
    ZooTask("mirror", "the text followed by its reverse", lambda s: s + s[::-1], _short_word),
    ZooTask("dash-between", "a dash between consecutive characters", lambda s: "-".join(s), _short_word),
    # word picks and a digit substitution
    ZooTask("first-word", "the first word", lambda s: s.split(" ")[0], _words),
    ZooTask("last-word", "the last word", lambda s: s.split(" ")[-1], _words),
    ZooTask("leetspeak", "a->4 e->3 i->1 o->0 s->5 t->7, upper case too",
            lambda s: s.translate(_LEET), _mixed),
)
TASKS_BY_NAME: dict[str, ZooTask] = {t.name: t for t in TASKS}
assert len(TASKS) == 30 and len(TASKS_BY_NAME) == 30


# Everything printable except the separator: what the base learns to echo besides the task inputs,
# so that every byte a task writes (digits, "*", "-", "_") has trained input and output embeddings.
# (A base that had only ever seen letters left those rows untrained, and adapters writing them stalled.)
ECHO_ALPHABET = "".join(c for c in string.printable[:95] if c != SEPARATOR)


def echo_input(rng: random.Random, split: str = "train") -> str:
    """Inputs for the base model's (echo) pretraining: every task generator's inputs, plus random
    printable strings (one in four)."""
    want_test = _split_of(split)
    while True:
        if rng.random() < 0.25:
            x = "".join(rng.choice(ECHO_ALPHABET) for _ in range(rng.randint(1, MAX_INPUT_CHARS)))
        else:
            x = rng.choice(TASKS).gen(rng)
        if is_held_out(x) == want_test:
            return x


def prompt(x: str) -> str:
    return x + SEPARATOR


def held_out(task: ZooTask, n: int, seed: int) -> list[str]:
    """`n` distinct held-out inputs of `task` (never trained on), the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        x = task.sample(rng, "test")
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
