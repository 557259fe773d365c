"""The request that crosses from the ingress to a model replica, and the prompt-size rule both sides apply.

A plain dict (a TypedDict: cheap to pickle, no engine classes needed on the ingress). The protocol
files (serve_app/tgi.py, serve_app/openai_api.py) build it; the replica (serve_app/core.py) turns
it into token ids and SamplingParams.
"""

from __future__ import annotations

from typing import Any, TypedDict

from engine import InvalidRequestError


class EngineRequest(TypedDict, total=False):
    """One generation request as the ingress sends it to a replica."""

    request_id: str
    adapter_id: str | None  # None, "" or the base model's served name mean the base model
    prompt: str | list[int]  # text or token ids ...
    messages: list[dict[str, Any]]  # ... or chat messages (rendered with the tokenizer's chat template)
    params: dict[str, Any]  # SamplingParams fields; max_new_tokens None = default_max_new_tokens
    default_max_new_tokens: int | None  # None: whatever room the context leaves
    truncate: int | None
    details: bool  # per-token details (ids, logprobs) in the final result
    arrival: float  # time.time() when the ingress received the request (for time to first token)


def prompt_chars(req: EngineRequest) -> int:
    """The size of a request's prompt in characters (chat: roles and contents), or token ids in a list."""
    messages = req.get("messages")
    if messages is not None:
        return sum(len(str(m.get("role") or "")) + len(str(m.get("content") or "")) for m in messages)
    return len(req.get("prompt") or "")


def check_prompt_size(req: EngineRequest, max_input_chars: int | None, max_model_len: int | None) -> None:
    """Refuse a prompt too big to tokenize (InvalidRequestError naming the field and the limit).

    The one rule for both sides: the ingress applies it with the limits from the replica's `info()`
    (before the prompt crosses to a replica), the replica again before it tokenizes.
    """
    size = prompt_chars(req)
    if req.get("messages") is not None:
        if max_input_chars is not None and size > max_input_chars:
            raise InvalidRequestError("messages", f"at most {max_input_chars} characters of roles and contents "
                                                  f"together (max_input_chars), given: {size}")
    elif isinstance(req.get("prompt"), list):
        if max_model_len is not None and size > max_model_len:
            raise InvalidRequestError("inputs", f"at most {max_model_len} token ids (max_model_len), given: {size}")
    elif max_input_chars is not None and size > max_input_chars:
        raise InvalidRequestError("inputs", f"`inputs` must have at most {max_input_chars} characters "
                                            f"(max_input_chars), given: {size}")
