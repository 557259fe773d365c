"""Structured output per request and per step: each request's grammar matcher, and the step's masks.

- `RequestGrammar` is one request's matcher; the engine advances it with each sampled token.
- `MaskFiller` fills one [rows with a grammar, vocab] bitmask per step with xgrammar's batched call
  and `GrammarMask.apply` masks those logits rows with one gather and one fill; other rows are not
  touched (their tokens stay identical with and without grammar requests in the batch).

Compiling the grammars is engine/grammar.py's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


def xgrammar_module() -> Any:
    """xgrammar, imported on first use (a server without grammar requests never loads it)."""
    import xgrammar

    return xgrammar


class RequestGrammar:
    """One request's position in its grammar, and the vocabulary filter ANDed into its masks (or None)."""

    def __init__(self, compiled: Any, vocab_filter: torch.Tensor | None = None) -> None:
        self.matcher = xgrammar_module().GrammarMatcher(compiled)
        self.vocab_filter = vocab_filter

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (then nothing changed)."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token (EOS) was accepted."""
        return bool(self.matcher.is_terminated())


@dataclass(frozen=True)
class GrammarMask:
    """Allowed tokens of some rows of a logits batch: bit j % 32 of word j // 32 of a row = token j."""

    rows: torch.Tensor  # [k] long: rows of the batch that have a grammar
    bitmask: torch.Tensor  # [k, ceil(vocab / 32)] int32
    all_rows: bool  # every row of the batch has a grammar (no gather needed)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed logits of the masked rows to -inf, in place; other rows are not touched."""
        k, vocab = self.bitmask.shape[0], logits.shape[1]
        packed = self.bitmask.to(logits.device).view(torch.uint8)
        if sys.byteorder == "big":  # bits 0-7 of a word are its last byte there
            packed = packed.view(k, -1, 4).flip(-1).reshape(k, -1)
        allowed = _bit_table(logits.device)[packed.long()].view(k, -1)[:, :vocab]
        if self.all_rows:
            logits.masked_fill_(~allowed, float("-inf"))
            return
        rows = self.rows.to(logits.device)
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(~allowed, float("-inf")))


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: the bits of each byte value, lowest first (a byte lookup beats 32 shifts per word)."""
    table = _BIT_TABLES.get(device)
    if table is None:
        table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool().to(device)
        _BIT_TABLES[device] = table
    return table


class MaskFiller:
    """Fills the bitmask of a step's grammar rows with one batched xgrammar call (its own threads)."""

    def __init__(self) -> None:
        self._batch: Any = None

    def mask(self, grammars: list[RequestGrammar | None], vocab_size: int) -> GrammarMask | None:
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        xgr = xgrammar_module()
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        bitmask = torch.empty(len(rows), (vocab_size + 31) // 32, dtype=torch.int32)
        matchers = [grammars[i].matcher for i in rows]  # type: ignore[union-attr]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        filtered = [j for j, i in enumerate(rows) if grammars[i].vocab_filter is not None]  # type: ignore[union-attr]
        if filtered:  # one engine, one vocabulary: every filter in a batch is the same tensor
            bitmask[filtered] &= grammars[rows[filtered[0]]].vocab_filter  # type: ignore[union-attr,operator]
        return GrammarMask(torch.tensor(rows, dtype=torch.long), bitmask, len(rows) == len(grammars))
