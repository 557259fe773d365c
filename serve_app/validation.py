"""Typed field readers for JSON request bodies: each failure names the field and what was expected."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from serve_app.errors import ApiError


def require_object(body: Any, what: str = "request body") -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError(f"{what} must be a JSON object, got {type(body).__name__}", field=None)
    return body


def reject_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ApiError(
            f"unknown {where} field(s): {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}",
            field=unknown[0],
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
            raise ApiError(f"{key}: must be an integer, got {value!r}", field=key)
    if minimum is not None and value < minimum:
        raise ApiError(f"{key}: must be >= {minimum}, got {value}", field=key)
    if maximum is not None and value > maximum:
        raise ApiError(f"{key}: must be <= {maximum}, got {value}", field=key)
    return value


def get_float(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"{key}: must be a number, got {value!r}", field=key)
    return float(value)


def get_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ApiError(f"{key}: must be true or false, got {value!r}", field=key)
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
    return list(value)


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
