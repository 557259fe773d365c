"""Structured-output request fields into the engine's GrammarSpec: TGI's `grammar`, OpenAI's `response_format`.

TGI (`parameters.grammar`, also what `huggingface_hub.InferenceClient.text_generation(grammar=...)` sends):
    {"type": "json", "value": <a JSON schema, or a string holding one>}
    {"type": "regex", "value": "<pattern>"}
    {"type": "json_schema", "value": {"name": ..., "schema": <a JSON schema>}}   (TGI 3)
OpenAI (`response_format` on /v1/chat/completions and /v1/completions, as vLLM accepts it on both):
    {"type": "text"}                       no constraint
    {"type": "json_object"}                any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}
    and TGI's shapes above (`InferenceClient.chat_completion(response_format=...)` sends those).

Only the shape is checked here; whether the schema or regex compiles is the engine's answer (a 422 /
400 naming the problem). The size bound is GrammarSpec.validate's, applied here too so an oversized
grammar is refused before it crosses to a replica.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine import GrammarSpec
from serve_app.errors import ApiError
from serve_app.validation import reject_unknown, shown

TGI_TYPES = ("json", "regex", "json_schema")
OPENAI_TYPES = ("text", "json_object", "json_schema", "json", "regex")
ANY_OBJECT = '{"type": "object"}'


def _object(value: Any, where: str, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ApiError(f"{where}: must be a JSON object, got {shown(value)}", field=field)
    return value


def _schema_text(schema: Any, where: str, field: str) -> str:
    """A JSON schema (an object or a boolean, or a string holding one) as the text the engine compiles."""
    if isinstance(schema, str):  # TGI accepts the schema serialized, too
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ApiError(f"{where}: a string value must hold a JSON schema; it is not valid JSON ({exc.msg})",
                           field=field) from None
    if not isinstance(schema, (Mapping, bool)):
        raise ApiError(f"{where}: must be a JSON schema (an object or a boolean), got {shown(schema)}", field=field)
    # Key order is kept: it is the order in which the output will list the properties.
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _spec(grammar_type: str, value: str, field: str) -> GrammarSpec:
    spec = GrammarSpec(grammar_type, value)
    try:
        spec.validate()
    except ValueError as exc:  # InvalidRequestError: the engine's size rule, named after the client's field
        raise ApiError(str(exc).replace("grammar:", f"{field}:", 1), field=field) from None
    return spec


def _named_schema(config: Any, where: str, field: str) -> str:
    config = _object(config, where, field)
    reject_unknown(config, {"name", "schema", "strict", "description"}, where)
    if "schema" not in config:
        raise ApiError(f"{where}.schema: is required", field=field)
    return _schema_text(config["schema"], f"{where}.schema", field)


def _tgi_shape(body: Mapping[str, Any], where: str, field: str) -> GrammarSpec:
    kind, value = body.get("type"), body.get("value")
    if value is None:
        raise ApiError(f"{where}.value: is required for type {kind!r}", field=field)
    if kind == "regex":
        if not isinstance(value, str):
            raise ApiError(f"{where}.value: a regex must be a string, got {shown(value)}", field=field)
        return _spec("regex", value, field)
    if kind == "json_schema":
        return _spec("json", _named_schema(value, f"{where}.value", field), field)
    return _spec("json", _schema_text(value, f"{where}.value", field), field)


def tgi_grammar(raw: Any) -> GrammarSpec | None:
    """`parameters.grammar` of a TGI request (None or absent: no constraint)."""
    if raw is None:
        return None
    body = _object(raw, "grammar", "grammar")
    reject_unknown(body, {"type", "value"}, "grammar")
    kind = body.get("type")
    if kind not in TGI_TYPES:
        raise ApiError(f"grammar.type: must be one of {list(TGI_TYPES)}, got {shown(kind)}", field="grammar")
    return _tgi_shape(body, "grammar", "grammar")


def response_format(raw: Any) -> GrammarSpec | None:
    """OpenAI's `response_format` (None, absent or {"type": "text"}: no constraint)."""
    field = "response_format"
    if raw is None:
        return None
    body = _object(raw, field, field)
    kind = body.get("type")
    if kind not in OPENAI_TYPES:
        raise ApiError(f"response_format.type: must be one of {list(OPENAI_TYPES)}, got {shown(kind)}", field=field)
    if kind in ("text", "json_object"):
        reject_unknown(body, {"type"}, field)
        return None if kind == "text" else _spec("json", ANY_OBJECT, field)
    if kind == "json_schema" and "json_schema" in body:  # OpenAI's shape
        reject_unknown(body, {"type", "json_schema"}, field)
        return _spec("json", _named_schema(body["json_schema"], "response_format.json_schema", field), field)
    if kind == "json_schema" and "value" not in body:
        raise ApiError("response_format.json_schema: is required for type 'json_schema'", field=field)
    reject_unknown(body, {"type", "value"}, field)
    return _tgi_shape(body, field, field)
