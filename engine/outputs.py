"""What `Engine.generate` yields: token deltas while decoding, then one final result."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class RequestOutput:
    """One streamed step of a request.

    `text` / `tokens` are the delta since the previous output. The last output has `finished`
    set with `finish_reason` in TGI's vocabulary: "length", "eos_token" or "stop_sequence"
    (or "aborted"), the whole `generated_text`, token counts, and the seed that was used.
    """

    request_id: str
    text: str
    tokens: tuple[TokenInfo, ...]
    finished: bool = False
    finish_reason: str | None = None
    generated_text: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int | None = None
    prefill: tuple[TokenInfo, ...] = ()
    top_tokens: tuple[tuple[TokenInfo, ...], ...] = ()
    adapter_id: str | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)
