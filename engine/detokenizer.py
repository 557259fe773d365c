"""Incremental detokenizer and stop-sequence matching for one request.

Text is produced by decoding a small window of ids that starts a few tokens before the new ones
and subtracting the window's old text. Decoding in context keeps SentencePiece's leading spaces
right, and a window that ends in U+FFFD (a UTF-8 character split across tokens) is held back until
the character is complete.
"""

from __future__ import annotations

from typing import Any

_WINDOW = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...], include_stop: bool) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - _WINDOW, 0)
        self.read_offset = len(self.ids)
        self.text = ""  # generated text decoded so far (before stop-sequence truncation)
        self.stop = stop
        self.include_stop = include_stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.emitted = 0  # characters of `text` already handed to the caller
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, flush: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped_by` when a stop sequence appears."""
        if self.stopped_by is not None:
            return
        self.ids.append(token_id)
        before = len(self.text)
        self._advance(flush=False)
        if self.stop and len(self.text) > before:
            self._check_stop(before)

    def _check_stop(self, before: int) -> None:
        start = max(0, before - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
            self.stopped_by = s

    def finish(self) -> None:
        """Decode whatever is still pending (an incomplete character at the very end)."""
        if self.stopped_by is None:
            before = len(self.text)
            self._advance(flush=True)
            if self.stop and len(self.text) > before:
                self._check_stop(before)

    def take(self, final: bool) -> str:
        """Text not yet handed out. While running, hold back a tail that could start a stop sequence."""
        end = len(self.text)
        if not final and self.stopped_by is None and self.max_stop_len > 1:
            end = max(self.emitted, end - (self.max_stop_len - 1))
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
