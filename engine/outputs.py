"""What `Engine.generate` yields: token deltas while decoding, then one final result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from engine.errors import EngineDeadError


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


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput | None:
    """A request's streamed outputs as one final output with every token's details (None: it did not finish).

    The one place that gathers a stream: `final_output` (the engines' `complete`) and the replica's non-streamed requests.
    """
    if not outputs or not outputs[-1].finished:
        return None
    tokens = tuple(t for out in outputs for t in out.tokens)
    top = tuple(alts for out in outputs for alts in out.top_tokens)
    prefill = next((out.prefill for out in reversed(outputs) if out.prefill), ())
    return replace(outputs[-1], tokens=tokens, top_tokens=top, prefill=prefill)


async def final_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Run a request's stream to its end and return the merged final output (`complete` of Engine
    and EngineProcess); EngineDeadError if the stream ended without one."""
    final = merge_outputs([out async for out in outputs])
    if final is None:
        raise EngineDeadError("stream ended without a final output")
    return final
