"""OpenAI-compatible completions and chat completions: parsing requests into engine requests.

The responses, stream chunks and `/v1/models` are serve_app/openai_responses.py's.

`model` names the adapter (the base model's id, or no model, means the base model), as TGI's and
vLLM's OpenAI routes do. Features that would change the output and are not implemented (n > 1,
presence_penalty, logit_bias, tools, ...) are a 400 naming the field. `response_format` (JSON mode,
JSON schema; serve_app/grammar_params.py) constrains the output on both routes, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine import MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS
from serve_app.engine_request import EngineRequest
from serve_app.errors import ApiError
from serve_app.grammar_params import response_format
from serve_app.validation import (
    check_range,
    get_adapter_id,
    get_bool,
    get_float,
    get_int,
    get_stop,
    get_str,
    reject_unknown,
    require_object,
    shown,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "user",
    # extensions vLLM and TGI accept as well
    "top_k", "repetition_penalty",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix", "response_format"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
    "function_call", "response_format", "parallel_tool_calls",
}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 on the replica; the vocabulary bound is checked there


@dataclass
class OpenAIRequest:
    chat: bool
    adapter_id: str | None  # `model`: an adapter id, the base model's name, or None
    stream: bool
    include_usage: bool
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    echo: bool = False
    logprobs: int | None = None  # number of top alternatives per token; None = no logprobs
    default_max_new_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def engine_request(self, request_id: str, arrival: float) -> EngineRequest:
        req = EngineRequest(
            request_id=request_id,
            adapter_id=self.adapter_id,
            params=self.params,
            default_max_new_tokens=self.default_max_new_tokens,
            details=self.logprobs is not None,
            arrival=arrival,
        )
        if self.chat:
            req["messages"] = self.messages or []
        else:
            req["prompt"] = self.prompt if self.prompt is not None else ""
        return req


def _unsupported(body: Mapping[str, Any], key: str, allowed: Sequence[Any] = (None,)) -> None:
    if body.get(key) not in allowed:
        raise ApiError(f"{key}: not supported by this server (got {shown(body.get(key))})", field=key)


def _sampling(body: Mapping[str, Any], max_tokens: int | None, top_n_tokens: int) -> dict[str, Any]:
    """The SamplingParams fields of both routes (`response_format` included)."""
    temperature = get_float(body, "temperature")
    check_range("temperature", temperature, 0.0, 2.0)
    top_p = get_float(body, "top_p")
    check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    frequency_penalty = get_float(body, "frequency_penalty")
    check_range("frequency_penalty", frequency_penalty, -2.0, 2.0)
    presence_penalty = get_float(body, "presence_penalty")
    if presence_penalty not in (None, 0.0):
        raise ApiError("presence_penalty: not supported by this server (only 0)", field="presence_penalty")
    top_k = get_int(body, "top_k", minimum=-1)
    repetition_penalty = get_float(body, "repetition_penalty")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ApiError(f"repetition_penalty: must be > 0, got {repetition_penalty}", field="repetition_penalty")
    n = get_int(body, "n")
    if n not in (None, 1):
        raise ApiError(f"n: only n=1 is supported, got {n}", field="n")
    logit_bias = body.get("logit_bias")
    if logit_bias not in (None, {}):
        raise ApiError("logit_bias: not supported by this server", field="logit_bias")
    get_str(body, "user")
    # OpenAI's default temperature is 1 (sampling); 0 means greedy.
    temp = 1.0 if temperature is None else temperature
    return {
        "max_new_tokens": max_tokens,
        "do_sample": temp > 0.0,
        "temperature": temp,
        "top_p": top_p if top_p is not None else 1.0,
        "top_k": max(top_k or 0, 0),
        "repetition_penalty": repetition_penalty if repetition_penalty is not None else 1.0,
        "frequency_penalty": frequency_penalty or 0.0,
        "seed": get_int(body, "seed", minimum=0, maximum=2**64 - 1),
        "stop": get_stop(body, "stop", MAX_STOP_SEQUENCES),
        "include_stop_str_in_output": False,  # OpenAI cuts the stop sequence
        "top_n_tokens": top_n_tokens,
        "grammar": response_format(body.get("response_format")),
    }


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(get_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        options = require_object(options, "stream_options")
        reject_unknown(options, {"include_usage", "continuous_usage_stats"}, "stream_options")
        if not stream:
            raise ApiError("stream_options: only allowed when stream is true", field="stream_options")
        include_usage = bool(get_bool(options, "include_usage"))
    return stream, include_usage


def parse_completion(body: Any) -> OpenAIRequest:
    body = require_object(body)
    reject_unknown(body, COMPLETION_FIELDS, "request")
    prompt = body.get("prompt")
    # One prompt only: a string, a one-element list of strings, token ids, or a one-element list of those.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("prompt: must not be empty", field="prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0 or max(prompt) > MAX_TOKEN_ID:
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise ApiError(f"prompt: token ids must be in [0, {MAX_TOKEN_ID}], got {shown(bad)}", field="prompt")
        prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError("prompt: batches of prompts are not supported; send one prompt per request", field="prompt")
    else:
        raise ApiError("prompt: must be a non-empty string or a non-empty list of token ids", field="prompt")
    for key in ("suffix",):
        _unsupported(body, key)
    best_of = get_int(body, "best_of")
    if best_of not in (None, 1):
        raise ApiError(f"best_of: only best_of=1 is supported, got {best_of}", field="best_of")
    echo = bool(get_bool(body, "echo"))
    if echo and not isinstance(prompt, str):
        raise ApiError("echo: only supported with a text prompt", field="echo")
    logprobs = get_int(body, "logprobs", minimum=0, maximum=MAX_TOP_N_TOKENS)
    if echo and logprobs is not None:
        raise ApiError("echo: echo together with logprobs (prompt logprobs) is not supported", field="echo")
    max_tokens = get_int(body, "max_tokens", minimum=1)
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, max_tokens, logprobs or 0)
    return OpenAIRequest(
        chat=False, adapter_id=get_adapter_id(body, "model"), stream=stream, include_usage=include_usage,
        prompt=prompt, echo=echo, logprobs=logprobs, default_max_new_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
        params=params,
    )


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise ApiError(f"{where}: must be an object with `role` and `content`", field="messages")
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(f"{where}.role: must be one of {sorted(ROLES)}, got {shown(role)}", field="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text parts are supported
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"{where}.content: only text parts are supported", field="messages")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(f"{where}.content: must be a string or a list of text parts", field="messages")
    if m.get("tool_calls"):
        raise ApiError(f"{where}.tool_calls: tool calls are not supported", field="messages")
    return {"role": role, "content": content}


def parse_chat(body: Any) -> OpenAIRequest:
    body = require_object(body)
    reject_unknown(body, CHAT_FIELDS, "request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: must be a non-empty list", field="messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    for key in ("tools", "functions"):
        _unsupported(body, key, (None, []))
    for key in ("tool_choice", "function_call"):
        _unsupported(body, key, (None, "none"))
    get_bool(body, "parallel_tool_calls")
    want_logprobs = bool(get_bool(body, "logprobs"))
    top_logprobs = get_int(body, "top_logprobs", minimum=0, maximum=MAX_TOP_N_TOKENS)
    if top_logprobs and not want_logprobs:
        raise ApiError("top_logprobs: requires logprobs to be true", field="top_logprobs")
    max_tokens = get_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", minimum=1)
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, max_tokens, top_logprobs or 0)
    return OpenAIRequest(
        chat=True, adapter_id=get_adapter_id(body, "model"), stream=stream, include_usage=include_usage,
        messages=parsed, logprobs=(top_logprobs or 0) if want_logprobs else None, params=params,
    )
