"""PEFT's module-name patterns (rank_pattern / alpha_pattern keys, a target_modules regex), matched safely.

PEFT's rules, which these follow exactly:
- a rank_pattern / alpha_pattern key is a regex matched against a module's name as
  `re.match(rf"(.*\\.)?({key})$", name)`; the first key (in the file's order) that matches wins
  (`peft.utils.other.get_pattern_key`). Plain keys work as expected: "q_proj",
  "model.layers.0.self_attn.q_proj", r"layers\\.\\d+\\.mlp\\.down_proj".
- a target_modules / exclude_modules *string* is `re.fullmatch(pattern, name)`.

The patterns come from an adapter's file, and Python's `re` backtracks: "(a+)+x" or ".?.?.?…x"
against a module name keeps a loader thread busy for minutes. So a pattern is refused (ValueError
naming the field and key) before anything is matched when it
- is longer than MAX_PATTERN_CHARS, or does not compile on its own;
- holds a backreference, a lookaround or a conditional (\\1, (?P=x), (?=, (?!, (?<=, (?<!, (?();
- quantifies a group that itself holds a quantifier or an alternation ("(a+)+", "(a|aa)*",
  "(a*){3}": nested quantifiers, the catastrophic case);
- holds more than MAX_QUANTIFIERS variable quantifiers (*, +, ?, {m,n}).
A table may hold at most MAX_PATTERN_KEYS keys and MAX_TABLE_QUANTIFIERS quantifiers in all. What
passes matches a module name (tens of characters) in at most a few milliseconds, for every
module of a large model well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_PATTERN_CHARS = 256
MAX_QUANTIFIERS = 3
MAX_PATTERN_KEYS = 1024
MAX_TABLE_QUANTIFIERS = 16

_FORBIDDEN_GROUPS = {"(?=": "a lookahead", "(?!": "a lookahead", "(?<=": "a lookbehind", "(?<!": "a lookbehind",
                     "(?(": "a conditional", "(?P=": "a backreference"}
_QUANTIFIER_BRACES = re.compile(r"\{(\d*)(,?)(\d*)\}")
_GROUP_FLAGS = re.compile(r"\(\?[aiLmsux]*(?:-[imsx]+)?([:)])")

PatternTable = tuple[tuple[str, "re.Pattern[str]"], ...]


def _group_prefix_end(pattern: str, i: int) -> tuple[int, bool]:
    """Index just past a group's opening syntax at `i`, and whether it opens a group (False: "(?i)", "(?#…)")."""
    if not pattern.startswith("(?", i):
        return i + 1, True
    for prefix, what in _FORBIDDEN_GROUPS.items():
        if pattern.startswith(prefix, i):
            raise ValueError(f"holds {what} ({prefix}), which is not allowed in a pattern")
    if pattern.startswith(("(?:", "(?>"), i):
        return i + 3, True
    if pattern.startswith("(?P<", i):
        end = pattern.find(">", i)
        return (end + 1 if end > 0 else len(pattern)), True
    if pattern.startswith("(?#", i):
        end = pattern.find(")", i)
        return (end + 1 if end > 0 else len(pattern)), False
    flags = _GROUP_FLAGS.match(pattern, i)
    if flags is not None:
        return flags.end(), flags.group(1) == ":"
    raise ValueError("holds a group syntax that is not supported in a pattern")


def _count_quantifiers(pattern: str) -> int:
    """The number of variable quantifiers; raises ValueError on a forbidden construct (see module doc)."""
    frames: list[list[bool]] = [[False, False]]  # per open group: holds a quantifier, holds an alternation
    atom: list[bool] | None = None  # what a quantifier here would repeat: a group's flags, [] for one char
    count = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1:i + 2].isdigit() and pattern[i + 1] != "0":
                raise ValueError(f"holds a backreference (\\{pattern[i + 1]}), which is not allowed in a pattern")
            i, atom = i + 2, []
        elif c == "[":
            j = i + 1
            j += pattern.startswith("^", j)
            j += pattern.startswith("]", j)
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, atom = j + 1, []
        elif c == "(":
            i, opens = _group_prefix_end(pattern, i)
            if opens:
                frames.append([False, False])
            atom = None
        elif c == ")":
            if len(frames) == 1:
                raise ValueError("has an unbalanced ')'")
            inner = frames.pop()
            frames[-1][0] |= inner[0]
            frames[-1][1] |= inner[1]
            i, atom = i + 1, inner
        elif c == "|":
            frames[-1][1] = True
            i, atom = i + 1, None
        elif c in "*+?" or (c == "{" and _QUANTIFIER_BRACES.match(pattern, i)):
            braces = _QUANTIFIER_BRACES.match(pattern, i) if c == "{" else None
            variable = braces is None or (bool(braces.group(2)) and braces.group(1) != braces.group(3))
            if atom is None:
                raise ValueError("has a quantifier with nothing to repeat")
            if atom and (atom[0] or atom[1]):
                raise ValueError("quantifies a group that holds a quantifier or an alternation (nested "
                                 "quantifiers backtrack exponentially)")
            if variable:
                count += 1
                frames[-1][0] = True
            i = braces.end() if braces is not None else i + 1
            if i < n and pattern[i] in "?+":  # lazy / possessive modifier of the same quantifier
                i += 1
            atom = None
        else:
            i, atom = i + 1, []
    if count > MAX_QUANTIFIERS:
        raise ValueError(f"holds {count} quantifiers (*, +, ?, {{m,n}}); at most {MAX_QUANTIFIERS} are allowed")
    return count


def compile_pattern(field: str, pattern: object, *, peft_key: bool) -> tuple[re.Pattern[str], int]:
    """A checked pattern and its quantifier count. peft_key: compiled as PEFT embeds a pattern key."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field}: keys must be non-empty strings, got {pattern!r}")
    shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
    what = f"{field}: {'key' if peft_key else 'pattern'} {shown!r}"
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        re.compile(pattern)  # on its own: a key like "a)|(b" must not escape PEFT's group around it
        # As PEFT embeds it (inline global flags are an error there too).
        compiled = re.compile(f"(?:{pattern})") if peft_key else re.compile(pattern)
        count = _count_quantifiers(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from exc
    return compiled, count


def pattern_table(field: str, table: Mapping[object, object]) -> PatternTable:
    """rank_pattern / alpha_pattern keys, checked and compiled, in the file's order (the first match wins)."""
    if len(table) > MAX_PATTERN_KEYS:
        raise ValueError(f"{field}: {len(table)} keys; at most {MAX_PATTERN_KEYS}")
    out: list[tuple[str, re.Pattern[str]]] = []
    total = 0
    for key in table:
        compiled, count = compile_pattern(field, key, peft_key=True)
        total += count
        if total > MAX_TABLE_QUANTIFIERS:
            raise ValueError(f"{field}: its keys hold more than {MAX_TABLE_QUANTIFIERS} quantifiers in all")
        out.append((str(key), compiled))
    return tuple(out)


def matches_key(compiled: re.Pattern[str], name: str) -> bool:
    """PEFT's `re.match(rf"(.*\\.)?({key})$", name)`: the key matches all of `name` or a part after a dot.

    Anchored matches at each dot boundary give the same answer without the `(.*\\.)?` prefix's own
    backtracking; `pos` keeps `^` meaning the name's real start, as in PEFT's expression.
    """
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    return any(compiled.fullmatch(name, start) is not None for start in starts)


def first_key(table: PatternTable, name: str) -> str | None:
    """The first key of `table` that matches module `name` (PEFT's get_pattern_key), or None."""
    for key, compiled in table:
        if matches_key(compiled, name):
            return key
    return None
