"""Turns sampled tokens into what callers see (as vLLM v1's OutputProcessor): finish reasons (EOS, stop
sequence, length), incremental text, per-token details (`TokenInfo`: text, logprob, top alternatives,
prompt logprobs) and the `RequestOutput` deltas and final result.

It owns no engine state: the engine hands it a request's `RequestStream` and one sampled token at a
time, under the engine lock, and does the bookkeeping of a finished request (scheduler, counters)
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput, TokenInfo
from engine.sequence import Sequence


@dataclass
class RequestStream:
    """One request's output state: its sequence, its detokenizer, and the caller's queue on its loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    detok: IncrementalDetokenizer
    seq: Sequence
    done: bool = False
    prefill_sent: bool = False

    def put(self, item: RequestOutput | BaseException) -> None:
        # A closed loop means the caller is gone: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class TokenStep:
    """One token added to a request: its details, and why the request ends with it (None: it goes on)."""

    token: TokenInfo
    top: tuple[TokenInfo, ...]
    finish_reason: str | None


def eos_token_ids(model_dir: Path, hf_config: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a generation: the model config's, the tokenizer's and generation_config.json's."""
    sources = [hf_config.eos_token_id, tokenizer.eos_token_id]
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return ids


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._special_ids = frozenset(tokenizer.all_special_ids)  # the property rebuilds a list per call

    def new_stream(self, seq: Sequence) -> RequestStream:
        """The output state of a new request; call on the caller's event loop."""
        params = seq.params
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.stop, params.include_stop_str_in_output)
        return RequestStream(asyncio.get_running_loop(), asyncio.Queue(), detok, seq)

    def token_info(self, token_id: int, logprob: float | None) -> TokenInfo:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return TokenInfo(token_id, text, logprob, token_id in self._special_ids)

    def add_token(self, stream: RequestStream, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenStep:
        """Append a sampled token to the request and decide whether it ends it."""
        seq, params = stream.seq, stream.seq.params
        seq.output_ids.append(token_id)
        reason: str | None = None
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        if not is_eos:
            stream.detok.add(token_id)
        if is_eos:
            reason = "eos_token"
        elif stream.detok.stopped_by is not None:
            reason = "stop_sequence"
        elif len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        token = self.token_info(token_id, logprob)
        alternatives = tuple(self.token_info(t, lp) for t, lp in top) if params.top_n_tokens else ()
        return TokenStep(token, alternatives, reason)

    def delta(self, stream: RequestStream, step: TokenStep) -> RequestOutput:
        """The output of a token that does not end the request."""
        seq = stream.seq
        return RequestOutput(
            request_id=seq.request_id,
            text=stream.detok.take(final=False),
            tokens=(step.token,),
            top_tokens=(step.top,) if step.top else (),
            prefill=self._prefill_once(stream),
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.output_ids),
            adapter_id=seq.adapter_id,
            token_ids=(step.token.id,),
        )

    def final(self, stream: RequestStream, reason: str, step: TokenStep | None = None) -> RequestOutput:
        """The last output of a request that ended for `reason` (with its last token, if one ended it)."""
        seq = stream.seq
        stream.detok.finish()
        return RequestOutput(
            request_id=seq.request_id,
            text=stream.detok.take(final=True),
            tokens=(step.token,) if step else (),
            top_tokens=(step.top,) if step and step.top else (),
            prefill=self._prefill_once(stream),
            finished=True,
            finish_reason=reason,
            generated_text=stream.detok.text,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.output_ids),
            seed=seq.seed,
            adapter_id=seq.adapter_id,
            token_ids=tuple(seq.output_ids),
        )

    def _prefill_once(self, stream: RequestStream) -> tuple[TokenInfo, ...]:
        # The prompt's tokens and logprobs (TGI's `prefill` details) go out with the first output only.
        seq = stream.seq
        if stream.prefill_sent or not seq.params.prompt_logprobs:
            return ()
        stream.prefill_sent = True
        lps = seq.prompt_logprobs + [None] * (len(seq.prompt_ids) - len(seq.prompt_logprobs))
        return tuple(self.token_info(t, lp) for t, lp in zip(seq.prompt_ids, lps))
