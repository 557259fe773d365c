"""Turns one scheduled batch into tensors, runs the model over the paged cache, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapter_slots import AdapterSlots
from engine.attention import AttentionBatch, DecodeGroup, KVCache, PrefillSpan, padded_kv_slots
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


class ModelRunner:
    def __init__(
        self, model: CausalLM, kv: KVCache, blocks: BlockManager, slots: AdapterSlots, lora_ops: LoraOps, device: str
    ) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.slots = slots
        self.lora_ops = lora_ops
        self.device = torch.device(device)
        self.grammar_masks = MaskFiller()

    def _slots_of(self, seq_ids: list[str], lengths: list[int]) -> torch.Tensor:
        """[len(seq_ids), max(lengths)] flat cache slots of positions 0..length-1, padded with own data."""
        tables = [self.blocks.table(sid) for sid in seq_ids]
        return padded_kv_slots(tables, lengths, self.blocks.block_size, self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        # Decodes sorted by context length, so each attention group pads to a similar length.
        decodes = sorted(batch.decodes, key=lambda s: s.seq.num_computed)
        rows: list[ScheduledSeq] = batch.prefills + decodes
        input_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        spans: list[PrefillSpan] = []
        logit_rows: list[int] = []
        prompt_lp_rows: list[tuple[Sequence, int, int]] = []  # (seq, batch row, prompt position predicted)
        sampled_seqs: list[Sequence] = []

        prefill_ctx = [s.seq.num_computed + s.num_tokens for s in batch.prefills]
        prefill_slots = (
            self._slots_of([s.seq.request_id for s in batch.prefills], prefill_ctx) if batch.prefills else None
        )
        for i, s in enumerate(rows):
            seq, start = s.seq, s.seq.num_computed
            row0 = len(input_ids)
            for pos in range(start, start + s.num_tokens):
                input_ids.append(seq.token_at(pos))
                positions.append(pos)
                token_slots.append(seq.adapter_slot)
            if i < len(batch.prefills):
                assert prefill_slots is not None
                spans.append(PrefillSpan(row0, s.num_tokens, prefill_ctx[i], prefill_slots[i, : prefill_ctx[i]]))
                if seq.wants_prompt_logprobs:
                    for pos in range(start, start + s.num_tokens):
                        if pos + 1 < len(seq.prompt_ids) and len(seq.prompt_logprobs) <= pos + 1:
                            prompt_lp_rows.append((seq, row0 + pos - start, pos + 1))
            if s.samples:
                logit_rows.append(row0 + s.num_tokens - 1)
                sampled_seqs.append(seq)

        slot_mapping = [self.blocks.slot(s.seq.request_id, p) for s in rows for p in range(s.seq.num_computed, s.seq.num_computed + s.num_tokens)]
        num_prefill = sum(s.num_tokens for s in batch.prefills)
        dev = self.device
        groups = []
        for g in range(0, len(decodes), DECODE_GROUP):
            members = decodes[g : g + DECODE_GROUP]
            lens = [s.seq.num_computed + 1 for s in members]
            groups.append(
                DecodeGroup(
                    start=num_prefill + g,
                    end=num_prefill + g + len(members),
                    kv_slots=self._slots_of([s.seq.request_id for s in members], lens),
                    context_lens=torch.tensor(lens, device=dev),
                    positions=torch.tensor([n - 1 for n in lens], device=dev),
                )
            )
        attn = AttentionBatch(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            prefills=spans,
            num_prefill_tokens=num_prefill,
            decode_groups=groups,
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
