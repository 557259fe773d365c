"""Persistent step inputs on the device: each running sequence's block table, and one upload per step.

vLLM v1's InputBatch / BlockTable, cut to what this engine needs. A running sequence owns a row of a
device block table for as long as it runs; a step uploads only the table entries that are new since
the last step (a sequence grows by one block every `block_size` tokens) and one small int64 tensor per
step: for each batch row its table row, first position, token count and adapter slot, then the input
token ids. Positions, slot mapping, context lengths, query starts, per-token rows and per-token adapter
slots are computed from it on the device: no per-token Python, no host sync (on CUDA the upload is a
non-blocking copy from pinned memory).

A table row is released when its sequence stops running (finished, aborted, failed or preempted): the
next step sees its status, or the scheduler's preempted list, and hands the row to the next admission.
Entries past a sequence's last block are -1; no kernel reads them (each reads positions < its context).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledSeq
from engine.sequence import SeqStatus, Sequence
from kernels.lora_ops import LoraBatch

_META = 4  # per batch row: table row, first position, tokens this step, adapter slot


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 host values on `device` without a host sync (pinned staging and a non-blocking copy on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    # The caching host allocator keeps the pinned block alive until the copy has run.
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def step_tokens(seq: Sequence, start: int, n: int) -> list[int]:
    """Token ids at positions [start, start + n) of `seq` (prompt, then output)."""
    prompt = len(seq.prompt_ids)
    if start + n <= prompt:
        return seq.prompt_ids[start : start + n]
    if start >= prompt:
        return seq.output_ids[start - prompt : start - prompt + n]
    return seq.prompt_ids[start:] + seq.output_ids[: start + n - prompt]


@dataclass(frozen=True)
class StepInputs:
    """Device tensors of one step; batch rows [0, num_prefill_seqs) are prefill chunks, the rest decodes."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot each new token's K/V goes to
    row_seq: torch.Tensor  # [T] int64 batch row of each token
    block_tables: torch.Tensor  # [N, W] int64, the batch rows' tables, -1 past each one's last block
    context_lens: torch.Tensor  # [N] int64 tokens in the cache for each row after this step
    query_start: torch.Tensor  # [N + 1] int64 first token of each row, T last
    token_slots: torch.Tensor  # [T] int64 adapter slot of each token (-1: base model)
    table_rows: torch.Tensor  # [N] int64 each batch row's row of the persistent table
    num_prefill_seqs: int
    num_prefill_tokens: int
    lora: LoraBatch | None  # None when no token of the step has an adapter


class InputBatch:
    """Owns the persistent device block table and which running sequence holds which of its rows."""

    def __init__(self, blocks: BlockManager, device: torch.device, max_rows: int = 8, max_blocks: int = 8) -> None:
        self.blocks = blocks
        self.device = device
        self.block_size = blocks.block_size
        self.table = torch.full((max(1, max_rows), max(1, max_blocks)), -1, dtype=torch.long, device=device)
        self._row_of: dict[Sequence, int] = {}
        self._free_rows: list[int] = list(range(self.table.shape[0] - 1, -1, -1))
        # Per held row: the block list it was filled from (the block manager's, while the sequence owns
        # blocks) and how many of its entries are on the device. A different list (the sequence was
        # freed and re-admitted) rewrites the row; a longer one uploads only the new entries.
        self._source: dict[int, list[int]] = {}
        self._written: dict[int, int] = {}

    @property
    def num_held(self) -> int:
        return len(self._row_of)

    def row_of(self, seq: Sequence) -> int | None:
        return self._row_of.get(seq)

    def release(self, seqs: Seq[Sequence]) -> None:
        for seq in seqs:
            row = self._row_of.pop(seq, None)
            if row is not None:
                self._source.pop(row, None)
                self._written.pop(row, None)
                self._free_rows.append(row)

    def release_stopped(self) -> None:
        """Free the rows of sequences that no longer run (finished, aborted, failed, back to waiting)."""
        stopped = [seq for seq in self._row_of if seq.status is not SeqStatus.RUNNING]
        if stopped:
            self.release(stopped)

    def _grow(self, rows: int, blocks: int) -> None:
        old = self.table
        new_rows = max(old.shape[0], rows)
        new_blocks = max(old.shape[1], blocks)
        if (new_rows, new_blocks) == tuple(old.shape):
            return
        # Doubling keeps the number of regrowths logarithmic in the longest sequence and the batch.
        new_rows = max(new_rows, 2 * old.shape[0]) if new_rows > old.shape[0] else new_rows
        new_blocks = max(new_blocks, 2 * old.shape[1]) if new_blocks > old.shape[1] else new_blocks
        table = torch.full((new_rows, new_blocks), -1, dtype=torch.long, device=self.device)
        table[: old.shape[0], : old.shape[1]] = old
        self._free_rows = list(range(new_rows - 1, old.shape[0] - 1, -1)) + self._free_rows
        self.table = table

    def _assign(self, seq: Sequence) -> int:
        row = self._row_of.get(seq)
        if row is None:
            if not self._free_rows:
                self._grow(self.table.shape[0] + 1, 0)
            row = self._free_rows.pop()
            self._row_of[seq] = row
        return row

    def _table_updates(self, row: int, table: list[int], updates: list[list[int]]) -> None:
        """Append the (row, column, block) entries that bring the device row up to `table`."""
        if self._source.get(row) is not table:
            # A new holder, or the same sequence with a new block list: rewrite the row, -1 past its end.
            previous = self._written.get(row, self.table.shape[1])
            self._source[row] = table
            self._written[row] = 0
            stale = range(len(table), min(previous, self.table.shape[1]))
            updates[0].extend([row] * len(stale))
            updates[1].extend(stale)
            updates[2].extend([-1] * len(stale))
        fresh = range(self._written[row], len(table))
        updates[0].extend([row] * len(fresh))
        updates[1].extend(fresh)
        updates[2].extend(table[fresh.start :])
        self._written[row] = len(table)

    def prepare(self, rows: list[ScheduledSeq], num_prefill_seqs: int) -> StepInputs:
        """Assign table rows, upload what changed, and build the step's device inputs (no host sync)."""
        self.release_stopped()
        tables = [self.blocks.table(s.seq.request_id) for s in rows]
        widest = max((len(t) for t in tables), default=0)
        if widest > self.table.shape[1] or len(rows) > self.table.shape[0]:
            self._grow(len(rows), widest)
        # Column-major (all table rows, then all starts, ...) so that each column is a contiguous tensor.
        meta: list[list[int]] = [[], [], [], []]
        ids: list[int] = []
        updates: list[list[int]] = [[], [], []]  # table rows, columns, block ids
        num_prefill_tokens = 0
        any_adapter = False
        for i, (s, table) in enumerate(zip(rows, tables)):
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            row = self._assign(seq)
            if len(table) != self._written.get(row, -1) or self._source.get(row) is not table:
                self._table_updates(row, table, updates)
            for column, value in zip(meta, (row, start, n, seq.adapter_slot)):
                column.append(value)
            if n == 1:
                ids.append(seq.token_at(start))
            else:
                ids.extend(step_tokens(seq, start, n))
            if i < num_prefill_seqs:
                num_prefill_tokens += n
            any_adapter = any_adapter or seq.adapter_slot >= 0
        return self._build(meta, ids, updates, len(rows), num_prefill_seqs, num_prefill_tokens, any_adapter)

    def _build(
        self,
        meta: list[list[int]],
        ids: list[int],
        updates: list[list[int]],
        num_rows: int,
        num_prefill_seqs: int,
        num_prefill_tokens: int,
        any_adapter: bool,
    ) -> StepInputs:
        dev = self.device
        num_tokens = len(ids)
        packed = upload([*meta[0], *meta[1], *meta[2], *meta[3], *ids, *updates[0], *updates[1], *updates[2]], dev)
        table_rows, starts, counts, slots = packed[: _META * num_rows].view(_META, num_rows).unbind(0)
        input_ids = packed[_META * num_rows : _META * num_rows + num_tokens]
        if updates[0]:
            triples = packed[_META * num_rows + num_tokens :].view(3, -1)
            self.table.index_put_((triples[0], triples[1]), triples[2])
        query_start = torch.zeros(num_rows + 1, dtype=torch.long, device=dev)
        torch.cumsum(counts, 0, out=query_start[1:])
        if num_tokens == num_rows:  # decode only (or one-token chunks): a token per row
            row_seq = torch.arange(num_rows, device=dev)
            positions = starts
        else:
            # output_size: without it repeat_interleave reads the total back to the host (a sync)
            row_seq = torch.repeat_interleave(torch.arange(num_rows, device=dev), counts, output_size=num_tokens)
            positions = starts[row_seq] + torch.arange(num_tokens, device=dev) - query_start[row_seq]
        block_tables = self.table.index_select(0, table_rows)
        bs = self.block_size
        slot_mapping = block_tables[row_seq, positions // bs] * bs + positions % bs
        token_slots = slots[row_seq] if num_tokens != num_rows else slots
        lora = None
        if any_adapter:
            lora = self._lora_batch(meta, num_prefill_seqs, token_slots, num_prefill_tokens, dev)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            row_seq=row_seq,
            block_tables=block_tables,
            context_lens=starts + counts,
            query_start=query_start,
            token_slots=token_slots,
            table_rows=table_rows,
            num_prefill_seqs=num_prefill_seqs,
            num_prefill_tokens=num_prefill_tokens,
            lora=lora,
        )

    @staticmethod
    def _lora_batch(
        meta: list[list[int]],
        num_prefill_seqs: int,
        token_slots: torch.Tensor,
        num_prefill_tokens: int,
        dev: torch.device,
    ) -> LoraBatch:
        """SGMV segments over the prefill rows (neighbouring chunks of one slot merged), from per-row data."""
        starts: list[int] = []
        lens: list[int] = []
        seg_slots: list[int] = []
        row0 = 0
        for n, slot in zip(meta[2][:num_prefill_seqs], meta[3][:num_prefill_seqs]):
            if seg_slots and seg_slots[-1] == slot:
                lens[-1] += n
            else:
                starts.append(row0)
                lens.append(n)
                seg_slots.append(slot)
            row0 += n
        segments = upload(starts + lens + seg_slots, dev).view(3, -1)
        return LoraBatch(
            token_slots=token_slots,
            num_prefill_tokens=num_prefill_tokens,
            seg_starts=segments[0],
            seg_lens=segments[1],
            seg_slots=segments[2],
            any_adapter=True,
        )
