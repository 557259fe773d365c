"""Turns one scheduled batch into tensors, runs the model over the paged cache, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import cpu_attention, cpu_linear, cpu_lora
from engine.adapter_slots import AdapterSlots
from engine.attention import (
    AttentionBatch,
    DecodeGroup,
    KVCache,
    PagedRows,
    PrefillSpan,
    block_table_tensor,
    padded_kv_slots,
)
from engine.block_manager import BlockManager
from engine.grammar import MaskFiller
from engine.model import CausalLM, LoraContext
from engine.sampler import SampleRow, finite_rows, sample
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from kernels.lora_ops import LoraBatch, LoraOps

# Decode sequences attend in groups of this many, sorted by context length: each group pads only to
# its own longest context instead of the batch's (CPU attention cost is dominated by padded reads).
DECODE_GROUP = 16


@dataclass(frozen=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class StepResult:
    """What one step produced: sampled tokens, and the sequences whose logits came out NaN/Inf."""

    sampled: list[SampledToken]
    # Not sampled (and no prompt logprob recorded) this step; the engine fails each of these requests.
    nonfinite: list[Sequence]


def _tokens(seq: Sequence, start: int, n: int) -> list[int]:
    """Token ids at positions [start, start + n) of `seq` (prompt, then output)."""
    prompt = len(seq.prompt_ids)
    if start + n <= prompt:
        return seq.prompt_ids[start : start + n]
    if start >= prompt:
        return seq.output_ids[start - prompt : start - prompt + n]
    return seq.prompt_ids[start:] + seq.output_ids[: start + n - prompt]


class ModelRunner:
    def __init__(
        self, model: CausalLM, kv: KVCache, blocks: BlockManager, slots: AdapterSlots, lora_ops: LoraOps, device: str
    ) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.slots = slots
        self.device = torch.device(device)
        # The CPU fast path is decided once per engine (the native ops build, or load from their cache,
        # here and not mid-step): native LoRA, native attention, oneDNN linears; each has a torch path.
        self.lora_ops = cpu_lora.for_device(lora_ops, self.device)
        self.native_attention = cpu_attention.use_native(self.device)
        self.onednn_linear = cpu_linear.use_onednn(self.device, model.embed_tokens.weight.dtype)
        if self.onednn_linear:
            model.pack_linears_for_cpu()
        self.grammar_masks = MaskFiller()

    def _slots_of(self, tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """[len(tables), max(lengths)] flat cache slots of positions 0..length-1, padded with own data."""
        return padded_kv_slots(tables, lengths, self.blocks.block_size, self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        # The torch attention path pads each group of decodes to its longest: sorted by context length,
        # they pad little. The native path pads nothing, so decodes go by adapter slot instead: the
        # native LoRA op then meets runs of one slot, which it multiplies as a block.
        if self.native_attention:
            decodes = sorted(batch.decodes, key=lambda s: (s.seq.adapter_slot, s.seq.num_computed))
        else:
            decodes = sorted(batch.decodes, key=lambda s: s.seq.num_computed)
        rows: list[ScheduledSeq] = batch.prefills + decodes
        input_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        logit_rows: list[int] = []
        prompt_lp_rows: list[tuple[Sequence, int, int]] = []  # (seq, batch row, prompt position predicted)
        sampled_seqs: list[Sequence] = []

        for i, s in enumerate(rows):
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            row0 = len(input_ids)
            input_ids.extend(_tokens(seq, start, n))
            positions.extend(range(start, start + n))
            token_slots.extend([seq.adapter_slot] * n)
            if i < len(batch.prefills) and seq.wants_prompt_logprobs:
                for pos in range(start, start + n):
                    if pos + 1 < len(seq.prompt_ids) and len(seq.prompt_logprobs) <= pos + 1:
                        prompt_lp_rows.append((seq, row0 + pos - start, pos + 1))
            if s.samples:
                logit_rows.append(row0 + n - 1)
                sampled_seqs.append(seq)

        num_prefill = sum(s.num_tokens for s in batch.prefills)
        dev = self.device
        bs = self.blocks.block_size
        tables = [self.blocks.table(s.seq.request_id) for s in rows]
        block_tables = block_table_tensor(tables, dev)
        row_seq = torch.repeat_interleave(
            torch.arange(len(rows), device=dev), torch.tensor([s.num_tokens for s in rows], device=dev)
        )
        position_t = torch.tensor(positions, dtype=torch.long, device=dev)
        # Each new token's K/V goes to its position's slot in its own sequence's blocks.
        slot_mapping = block_tables[row_seq, position_t // bs] * bs + position_t % bs
        spans: list[PrefillSpan] = []
        groups: list[DecodeGroup] = []
        paged_rows = None
        if self.native_attention:
            paged_rows = PagedRows(block_tables, row_seq)
        else:
            spans, groups = self._torch_attention_rows(batch.prefills, decodes, tables, num_prefill)
        attn = AttentionBatch(
            positions=position_t,
            slot_mapping=slot_mapping,
            prefills=spans,
            num_prefill_tokens=num_prefill,
            decode_groups=groups,
            paged_rows=paged_rows,
        )
        lora = None
        if any(slot >= 0 for slot in token_slots):
            lora = LoraContext(self.slots.layers, LoraBatch.build(token_slots, num_prefill, dev), self.lora_ops)
        hidden = self.model(torch.tensor(input_ids, device=dev), attn, self.kv, lora)

        nonfinite: list[Sequence] = []
        if prompt_lp_rows:
            nonfinite = self._record_prompt_logprobs(hidden, prompt_lp_rows)
        if not logit_rows:
            return StepResult([], nonfinite)
        logits = self.model.logits(hidden[logit_rows])
        sample_rows = [
            SampleRow(seq.params, seq.generator, seq.prompt_ids + seq.output_ids, seq.output_ids) for seq in sampled_seqs
        ]
        # Structured output: one bitmask for the rows with a grammar (none of the work when no row has one).
        mask = self.grammar_masks.mask([seq.grammar for seq in sampled_seqs], logits.shape[-1])
        result = sample(logits, sample_rows, mask)
        nonfinite += [sampled_seqs[i] for i in result.nonfinite if sampled_seqs[i] not in nonfinite]
        sampled = [
            SampledToken(seq, tok, lp, top)
            for seq, tok, lp, top in zip(sampled_seqs, result.token_ids, result.logprobs, result.top_tokens)
            if seq not in nonfinite
        ]
        return StepResult(sampled, nonfinite)

    def _torch_attention_rows(
        self, prefills: list[ScheduledSeq], decodes: list[ScheduledSeq], tables: list[list[int]], num_prefill: int
    ) -> tuple[list[PrefillSpan], list[DecodeGroup]]:
        """The torch path's gather lists: one span per prefill chunk, decodes in groups of DECODE_GROUP."""
        dev = self.device
        spans: list[PrefillSpan] = []
        if prefills:
            ctx = [s.seq.num_computed + s.num_tokens for s in prefills]
            slots = self._slots_of(tables[: len(prefills)], ctx)
            row0 = 0
            for i, s in enumerate(prefills):
                spans.append(PrefillSpan(row0, s.num_tokens, ctx[i], slots[i, : ctx[i]]))
                row0 += s.num_tokens
        groups: list[DecodeGroup] = []
        decode_tables = tables[len(prefills) :]
        for g in range(0, len(decodes), DECODE_GROUP):
            members = decodes[g : g + DECODE_GROUP]
            lens = [s.seq.num_computed + 1 for s in members]
            groups.append(
                DecodeGroup(
                    start=num_prefill + g,
                    end=num_prefill + g + len(members),
                    kv_slots=self._slots_of(decode_tables[g : g + DECODE_GROUP], lens),
                    context_lens=torch.tensor(lens, device=dev),
                    positions=torch.tensor([n - 1 for n in lens], device=dev),
                )
            )
        return spans, groups

    def _record_prompt_logprobs(
        self, hidden: torch.Tensor, rows: list[tuple[Sequence, int, int]]
    ) -> list[Sequence]:
        """Append each prompt position's logprob to its sequence; returns the sequences with NaN/Inf logits."""
        logits = self.model.logits(hidden[[r for _, r, _ in rows]])
        finite = finite_rows(logits).tolist()
        targets = torch.tensor([seq.prompt_ids[pos] for seq, _, pos in rows], device=logits.device)
        values = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        bad = list(dict.fromkeys(seq for (seq, _, _), ok in zip(rows, finite) if not ok))
        for (seq, _, _), value in zip(rows, values):
            if seq not in bad:  # a failed request's later positions would be recorded out of order
                seq.prompt_logprobs.append(value)
        return bad
