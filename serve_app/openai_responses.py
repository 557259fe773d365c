"""OpenAI-compatible responses: completions, chat completions, their stream chunks, and `/v1/models`.

The requests they answer are parsed by serve_app/openai_api.py (`OpenAIRequest`). `model` in every
answer is the name the client asked for (an adapter id), or the base model's served name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from serve_app.errors import ErrorInfo, openai_error_body
from serve_app.openai_api import OpenAIRequest
from serve_app.streaming import sse

DONE = b"data: [DONE]\n\n"  # the event that ends every OpenAI stream


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_logprob(token: Mapping[str, Any], top: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    def one(t: Mapping[str, Any]) -> dict[str, Any]:
        return {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode())}

    out = one(token)
    out["top_logprobs"] = [one(t) for t in (top or [])]
    return out


def chat_logprobs(tokens: Sequence[Mapping[str, Any]], tops: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    return {"content": [_chat_logprob(t, tops[i] if i < len(tops) else None) for i, t in enumerate(tokens)]}


def completion_logprobs(tokens: Sequence[Mapping[str, Any]], tops: Sequence[Sequence[Mapping[str, Any]]],
                        offset: int = 0) -> dict[str, Any]:
    offsets: list[int] = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["text"])
    return {
        "tokens": [t["text"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [{a["text"]: a["logprob"] for a in tops[i]} if i < len(tops) else None
                         for i in range(len(tokens))] if tops else None,
        "text_offset": offsets,
    }


def completion_response(req: OpenAIRequest, result: Mapping[str, Any], request_id: str, model: str) -> dict[str, Any]:
    text = result["generated_text"]
    if req.echo and isinstance(req.prompt, str):
        text = req.prompt + text
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish_reason(result["finish_reason"])}
    if req.logprobs is not None:
        choice["logprobs"] = completion_logprobs(result.get("tokens", []), result.get("top_tokens", []))
    return {
        "id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [choice], "usage": usage(result["prompt_tokens"], result["generated_tokens"]),
    }


def chat_response(req: OpenAIRequest, result: Mapping[str, Any], request_id: str, model: str) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0, "message": {"role": "assistant", "content": result["generated_text"]}, "logprobs": None,
        "finish_reason": finish_reason(result["finish_reason"]),
    }
    if req.logprobs is not None:
        choice["logprobs"] = chat_logprobs(result.get("tokens", []), result.get("top_tokens", []))
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [choice], "usage": usage(result["prompt_tokens"], result["generated_tokens"]),
    }


def completion_chunk(req: OpenAIRequest, request_id: str, model: str, created: int, text: str,
                     delta: Mapping[str, Any] | None, reason: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
    if req.logprobs is not None and delta is not None and delta.get("token"):
        choice["logprobs"] = completion_logprobs([delta["token"]], [delta.get("top_tokens") or []])
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}


def chat_chunk(req: OpenAIRequest, request_id: str, model: str, created: int, content: dict[str, Any],
               delta: Mapping[str, Any] | None, reason: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason(reason)}
    if req.logprobs is not None and delta is not None and delta.get("token"):
        choice["logprobs"] = chat_logprobs([delta["token"]], [delta.get("top_tokens") or []])
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(req: OpenAIRequest, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if req.chat else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{request_id}", "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


class OpenAIStream:
    """The StreamEncoder (serve_app/streaming.py) of a streamed completion or chat completion: chunks
    as OpenAI sends them, the usage chunk when asked for, `[DONE]` at the end, after an error too."""

    def __init__(self, req: OpenAIRequest, request_id: str, model: str, prompt_field: str) -> None:
        self.req = req
        self.request_id = request_id
        self.model = model
        self.prompt_field = prompt_field  # the field an error about the prompt names
        self.created = int(time.time())

    def _chat(self, content: dict[str, Any], delta: Mapping[str, Any] | None, reason: str | None) -> bytes:
        return sse(chat_chunk(self.req, self.request_id, self.model, self.created, content, delta, reason))

    def start(self) -> list[bytes]:
        if self.req.chat:
            return [self._chat({"role": "assistant", "content": ""}, None, None)]
        if self.req.echo and isinstance(self.req.prompt, str):
            return [sse(completion_chunk(self.req, self.request_id, self.model, self.created, self.req.prompt,
                                         None, None))]
        return []

    def delta(self, delta: dict[str, Any]) -> list[bytes]:
        finished = delta["finished"]
        reason = delta.get("finish_reason") if finished else None
        out: list[bytes] = []
        if self.req.chat:
            if delta["text"] or self.req.logprobs is not None:
                out.append(self._chat({"content": delta["text"]}, delta, None))
            if finished:
                out.append(self._chat({}, None, reason))
        else:
            out.append(sse(completion_chunk(self.req, self.request_id, self.model, self.created, delta["text"],
                                            delta, reason)))
        if finished:
            if self.req.include_usage:
                out.append(sse(usage_chunk(self.req, self.request_id, self.model, self.created,
                                           delta["prompt_tokens"], delta["generated_tokens"])))
            out.append(DONE)
        return out

    def error(self, info: ErrorInfo) -> list[bytes]:
        return [sse(openai_error_body(info, self.prompt_field)), DONE]


def models_body(info: Mapping[str, Any]) -> dict[str, Any]:
    """`GET /v1/models`: the base model and every adapter, from a replica's info."""
    created = int(info.get("started", 0))
    base = info["model_id"]
    data = [{"id": base, "object": "model", "created": created, "owned_by": "loraserve", "root": base,
             "parent": None}]
    # `root` is the adapter's id, not its source: sources are paths, shown on the admin API only.
    data += [{"id": a["id"], "object": "model", "created": created, "owned_by": "loraserve",
              "root": a["id"], "parent": base} for a in info["adapters"]]
    return {"object": "list", "data": data}
