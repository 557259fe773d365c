"""Turns one scheduled batch into tensors, runs the model over the paged cache, samples the next tokens.

The step's inputs come from `engine.input_batch` (persistent device block tables, one upload per step),
attention takes the engine's backend (`engine.attention_backend`), and sampling runs on the device with
one host read for the whole batch (`engine.sampler`): on CUDA that read is the step's only host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import cpu_linear, cpu_lora, cpu_pointwise
from engine.adapter_slots import AdapterSlots
from engine.attention import (
    AttentionBatch,
    DecodeGroup,
    KernelRows,
    KVCache,
    PagedRows,
    PrefillSpan,
    padded_kv_slots,
)
from engine.attention_backend import resolve as attention_backend_for
from engine.block_manager import BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.grammar_mask import MaskFiller
from engine.input_batch import InputBatch, StepInputs, upload
from engine.model import CausalLM, LoraContext
from engine.sampler import PenaltyHistory, SampleResult, SampleRow, finite_rows, has_penalty, sample_on_device
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from kernels.lora_ops import LoraOps

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
        self,
        model: CausalLM,
        kv: KVCache,
        blocks: BlockManager,
        slots: AdapterSlots,
        lora_ops: LoraOps,
        device: str,
        attention_backend: str = "auto",
        max_num_seqs: int = 8,
        max_model_len: int = 128,
        use_cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.slots = slots
        self.device = torch.device(device)
        # The CPU fast path is decided once per engine (the native ops build, or load from their cache,
        # here and not mid-step): native LoRA, native attention, native pointwise ops, oneDNN linears; each
        # has a torch path.
        self.lora_ops = cpu_lora.for_device(lora_ops, self.device)
        self.attention_backend = attention_backend_for(attention_backend, self.device)
        self.native_attention = self.attention_backend == "native"
        self.onednn_linear = cpu_linear.use_onednn(self.device, model.embed_tokens.weight.dtype)
        if self.onednn_linear:
            model.pack_linears_for_cpu()
        model.pointwise = cpu_pointwise.for_device(self.device, model.embed_tokens.weight.dtype)
        self.grammar_masks = MaskFiller()
        max_blocks = blocks.blocks_for(max_model_len)
        self.inputs = InputBatch(blocks, self.device, max_num_seqs, max_blocks)
        self.penalty_history = PenaltyHistory(model.arch.vocab_size, self.device)
        # Decode steps from CUDA graphs (cuda_graphs.enabled decides: CUDA, Triton attention, not eager).
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs:
            self.graphs = DecodeGraphs(model, kv, slots.layers, self.lora_ops, max_num_seqs, max_blocks, self.device)
            self.graphs.capture_all()

    def _slots_of(self, tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """[len(tables), max(lengths)] flat cache slots of positions 0..length-1, padded with own data."""
        return padded_kv_slots(tables, lengths, self.blocks.block_size, self.device)

    def _order_decodes(self, decodes: list[ScheduledSeq]) -> list[ScheduledSeq]:
        # The torch attention path pads each group of decodes to its longest: sorted by context length,
        # they pad little. The native path pads nothing, so decodes go by adapter slot instead: the
        # native LoRA op then meets runs of one slot, which it multiplies as a block. The Triton kernels
        # take any order.
        if self.attention_backend == "native":
            return sorted(decodes, key=lambda s: (s.seq.adapter_slot, s.seq.num_computed))
        if self.attention_backend == "torch":
            return sorted(decodes, key=lambda s: s.seq.num_computed)
        return decodes

    def _attention_batch(
        self, step: StepInputs, prefills: list[ScheduledSeq], decodes: list[ScheduledSeq]
    ) -> AttentionBatch:
        spans: list[PrefillSpan] = []
        groups: list[DecodeGroup] = []
        paged_rows = kernel_rows = None
        if self.attention_backend == "native":
            paged_rows = PagedRows(step.block_tables, step.row_seq)
        elif self.attention_backend == "triton":
            n = step.num_prefill_seqs
            kernel_rows = KernelRows(step.block_tables, step.context_lens, step.query_start[: n + 1], n)
        else:
            tables = [self.blocks.table(s.seq.request_id) for s in prefills + decodes]
            spans, groups = self._torch_attention_rows(prefills, decodes, tables, step.num_prefill_tokens)
        return AttentionBatch(
            positions=step.positions,
            slot_mapping=step.slot_mapping,
            prefills=spans,
            num_prefill_tokens=step.num_prefill_tokens,
            decode_groups=groups,
            paged_rows=paged_rows,
            kernel_rows=kernel_rows,
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        decodes = self._order_decodes(batch.decodes)
        rows: list[ScheduledSeq] = batch.prefills + decodes
        step = self.inputs.prepare(rows, len(batch.prefills))
        bucket = None if self.graphs is None else self.graphs.bucket(step)
        if bucket is not None:
            hidden = self.graphs.run(step, bucket)  # type: ignore[union-attr]
        else:
            attn = self._attention_batch(step, batch.prefills, decodes)
            lora = None if step.lora is None else LoraContext(self.slots.layers, step.lora, self.lora_ops)
            hidden = self.model(step.input_ids, attn, self.kv, lora)

        logit_rows: list[int] = []
        prompt_lp_rows: list[tuple[Sequence, int, int]] = []  # (seq, batch row, prompt position predicted)
        sampled_seqs: list[Sequence] = []
        row0 = 0
        for i, s in enumerate(rows):
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            if i < len(batch.prefills) and seq.wants_prompt_logprobs:
                for pos in range(start, start + n):
                    if pos + 1 < len(seq.prompt_ids) and len(seq.prompt_logprobs) <= pos + 1:
                        prompt_lp_rows.append((seq, row0 + pos - start, pos + 1))
            if s.samples:
                logit_rows.append(row0 + n - 1)
                sampled_seqs.append(seq)
            row0 += n

        nonfinite: list[Sequence] = []
        if prompt_lp_rows:
            nonfinite = self._record_prompt_logprobs(hidden, prompt_lp_rows)
        if not logit_rows:
            return StepResult([], nonfinite)
        if len(logit_rows) < hidden.shape[0]:  # a decode-only step samples every row: no gather
            hidden = hidden.index_select(0, upload(logit_rows, self.device))
        logits = self.model.logits(hidden)
        result = self._sample(logits, sampled_seqs)
        nonfinite += [sampled_seqs[i] for i in result.nonfinite if sampled_seqs[i] not in nonfinite]
        sampled = [
            SampledToken(seq, tok, lp, top)
            for seq, tok, lp, top in zip(sampled_seqs, result.token_ids, result.logprobs, result.top_tokens)
            if seq not in nonfinite
        ]
        return StepResult(sampled, nonfinite)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        sample_rows = [SampleRow(seq.params, seq.generator) for seq in seqs]
        # Structured output: one bitmask for the rows with a grammar (none of the work when no row has one).
        mask = self.grammar_masks.mask([seq.grammar for seq in seqs], logits.shape[-1])
        penalised = [i for i, seq in enumerate(seqs) if has_penalty(seq.params)]
        penalties = None
        table_rows: list[int] = []
        if penalised:
            table_rows = [self.inputs.row_of(seqs[i]) for i in penalised]  # type: ignore[misc]
            penalties = self.penalty_history.gather(penalised, [seqs[i] for i in penalised], table_rows)
        on_device = sample_on_device(logits, sample_rows, mask, penalties)
        if penalised:
            picked = on_device.tokens.index_select(0, upload(penalised, self.device))
            self.penalty_history.record(table_rows, picked)
        return on_device.read()

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
        logits = self.model.logits(hidden.index_select(0, upload([r for _, r, _ in rows], self.device)))
        targets = upload([seq.prompt_ids[pos] for seq, _, pos in rows], self.device)
        values = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        read = torch.cat([finite_rows(logits).double(), values.double()]).tolist()  # one host read
        finite, values = read[: len(rows)], read[len(rows) :]
        bad = list(dict.fromkeys(seq for (seq, _, _), ok in zip(rows, finite) if not ok))
        for (seq, _, _), value in zip(rows, values):
            if seq not in bad:  # a failed request's later positions would be recorded out of order
                seq.prompt_logprobs.append(value)
        return bad
