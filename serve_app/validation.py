"""Request bodies: safe JSON parsing, then typed field readers; each failure names the field and what was expected.

`parse_json_body` is the one door every JSON body goes through: it refuses what `json.loads` would
turn into a crash or a 500 later (integers of thousands of digits, nesting deep enough to exhaust
the stack, NaN/Infinity, lone UTF-16 surrogates that no tokenizer or response encoder accepts),
each with a 4xx naming the problem and, where it can, the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from serve_app.errors import ApiError

_ADAPTER_ID = re.compile(r"^\S{1,256}$")
MAX_JSON_DEPTH = 32  # request bodies of this API nest 4 levels; 32 leaves room for any extension
INT_LIMIT = 2**64 - 1  # no integer field of this API is larger (seed is a u64, as in TGI)
MAX_STOP_CHARS = 512  # per stop sequence: the detokenizer scans this much text on every token
_MAX_SHOWN_CHARS = 60  # of an offending value quoted back in an error message
# A JSON `\u` escape of a UTF-16 surrogate (`\ud800` to `\udfff`). Raw surrogate bytes cannot pass strict UTF-8
# decoding, so a body without this escape (most have no backslash at all) cannot hold a lone
# surrogate and skips that check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def shown(value: Any) -> str:
    """A value quoted back to the client: bounded in size (a 4 MB string or a 4,000-digit number is
    not echoed whole), containers by type only."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


class _HugeInt:
    """An integer literal longer than any field allows, kept unconverted (see parse_json_body)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _bounded_int(literal: str) -> int | _HugeInt:
    digits = len(literal.lstrip("-"))
    return int(literal) if digits <= 40 else _HugeInt(digits)


def _no_constants(name: str) -> float:
    raise ApiError(f"request body: {name} is not valid JSON (RFC 8259 has no NaN or Infinity); send a finite "
                   f"number")


def _safe_key(key: str) -> str:
    """A JSON key as an error message may quote it: escaped (it may be the lone surrogate itself), bounded."""
    text = key.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


def _path_text(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{_safe_key(part)}" if out else _safe_key(part))
    return out or "request body"


def _field_of(path: tuple[str | int, ...]) -> str | None:
    """The field an error names: the top-level key, or the TGI parameter inside `parameters`."""
    keys = [_safe_key(p) for p in path if isinstance(p, str)]
    if len(keys) > 1 and keys[0] == "parameters":
        return keys[1]
    return keys[0] if keys else None


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise ApiError(f"{_path_text(path)}: contains a lone UTF-16 surrogate (\\u{code:04x}) at character "
                       f"{exc.start}; text must be valid Unicode (pair surrogates or send UTF-8)",
                       field=_field_of(path)) from None


def _check_tree(body: Any, check_strings: bool) -> None:
    """Depth, huge integers and (when the body has surrogate escapes) lone surrogates, iteratively."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise ApiError(f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels (at "
                           f"{_path_text(path[:4])}...)", field=_field_of(path))
        if isinstance(value, dict):
            for key, item in value.items():
                if check_strings:
                    _check_text(key, (*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            kinds = set(map(type, value))  # C speed: a list of a million token ids is not walked item by item
            if kinds.isdisjoint((dict, list, _HugeInt)) and not (check_strings and str in kinds):
                continue
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, _HugeInt):
            raise ApiError(f"{_path_text(path)}: an integer of {value.digits} digits is out of range (integers "
                           f"in this API are at most {INT_LIMIT})", field=_field_of(path))
        elif check_strings and isinstance(value, str):
            _check_text(value, path)


def parse_json_body(raw: bytes) -> Any:
    """The parsed JSON of a request body, or an ApiError (4xx) saying what is wrong with it."""
    if not raw or raw.isspace():
        raise ApiError("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(f"request body is not valid UTF-8 (byte {exc.start}); JSON must be UTF-8") from None
    try:
        try:
            body = json.loads(text, parse_constant=_no_constants)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise
            # Python refuses to convert integers of more than 4,300 digits (a ValueError from inside
            # json.loads). Parse again keeping long literals unconverted, to say which field it was.
            body = json.loads(text, parse_constant=_no_constants, parse_int=_bounded_int)
    except RecursionError:
        raise ApiError(f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ApiError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    escapes = raw.find(b"\\") >= 0 and _SURROGATE_ESCAPE.search(raw) is not None  # find(): memchr speed
    _check_tree(body, check_strings=escapes)
    return body


def require_object(body: Any, what: str = "request body") -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError(f"{what} must be a JSON object, got {type(body).__name__}", field=None)
    return body


def reject_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        named = ", ".join(k if len(k) <= _MAX_SHOWN_CHARS else shown(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ApiError(
            f"unknown {where} field(s): {named}{more}; supported: {', '.join(sorted(allowed))}",
            field=unknown[0] if len(unknown[0]) <= _MAX_SHOWN_CHARS else None,
        )


def get_int(obj: Mapping[str, Any], key: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python but not in JSON: `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ApiError(f"{key}: must be an integer, got {shown(value)}", field=key)
    low = -INT_LIMIT if minimum is None else minimum
    high = INT_LIMIT if maximum is None else maximum
    if value < low:
        raise ApiError(f"{key}: must be >= {low}, got {shown(value)}", field=key)
    if value > high:
        raise ApiError(f"{key}: must be <= {high}, got {shown(value)}", field=key)
    return value


def get_float(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"{key}: must be a finite number, got {shown(value)}", field=key)
    return float(value)


def get_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ApiError(f"{key}: must be true or false, got {shown(value)}", field=key)
    return value


def get_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(f"{key}: must be a string, got {type(value).__name__}", field=key)
    return value


def get_stop(obj: Mapping[str, Any], key: str, max_count: int, *, allow_str: bool = True) -> list[str]:
    """Stop sequences: a list of strings (OpenAI also allows a single string; TGI does not)."""
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, str) and allow_str:
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        expected = "a string or a list of strings" if allow_str else "a list of strings"
        raise ApiError(f"{key}: must be {expected}", field=key)
    if any(s == "" for s in value):
        raise ApiError(f"{key}: stop sequences must be non-empty", field=key)
    if len(value) > max_count:
        raise ApiError(f"{key}: at most {max_count} stop sequences, got {len(value)}", field=key)
    longest = max((len(s) for s in value), default=0)
    if longest > MAX_STOP_CHARS:
        raise ApiError(f"{key}: each stop sequence at most {MAX_STOP_CHARS} characters, got {longest}", field=key)
    return list(value)


def is_adapter_id(value: str) -> bool:
    """The one rule for adapter ids, in requests and on the admin API: 1 to 256 printable characters
    without whitespace, so that an id is safe in a log line, a URL and a metric label."""
    return bool(_ADAPTER_ID.match(value)) and value.isprintable()


def get_adapter_id(obj: Mapping[str, Any], key: str) -> str | None:
    """An adapter id (TGI `adapter_id`, OpenAI `model`), or None for none (the base model)."""
    value = get_str(obj, key)
    if value is None or value == "":
        return None
    if not is_adapter_id(value):
        raise ApiError(f"{key}: must be an adapter id of 1 to 256 printable characters without whitespace, got "
                       f"{shown(value)} ({len(value)} characters); GET /v1/models lists them", field=key)
    return value


def check_range(key: str, value: float | None, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ApiError(f"{key}: must be in {left}{low}, {high}{right}, got {value}", field=key)
