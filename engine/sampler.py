"""Per-request sampling over one batch of logits.

Each row has its own parameters. Processing follows Hugging Face `generate`'s order: repetition
and frequency penalties on the raw logits, then temperature, top-k, top-p and typical-p. Greedy rows
take the argmax of the penalised logits. Sampled rows draw one uniform number from their own
torch.Generator (seeded per request), so a seed gives the same tokens whatever else is in the batch.
Rows with a grammar (structured output) are masked to the tokens it allows before all of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.grammar import GrammarMask
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    history: list[int]  # prompt + generated tokens, for repetition penalty
    generated: list[int]  # generated tokens only, for frequency penalty


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # -1 for a row in `nonfinite`
    logprobs: list[float]  # nan for a row in `nonfinite`
    top_tokens: list[list[tuple[int, float]]]
    nonfinite: tuple[int, ...] = ()  # rows whose logits held NaN/Inf: not sampled, the caller fails them


def _penalise(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0 and row.history:
            ids = torch.tensor(sorted(set(row.history)), dtype=torch.long, device=logits.device)
            picked = logits[i].index_select(0, ids)
            picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            logits[i].index_copy_(0, ids, picked)
        if p.frequency_penalty != 0.0 and row.generated:
            ids = torch.tensor(row.generated, dtype=torch.long, device=logits.device)
            counts = torch.zeros_like(logits[i]).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p on one row; removed entries become -inf."""
    logits = logits / p.temperature
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = torch.where(logits < kth, neg_inf, logits)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - p.top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = torch.where(remove, neg_inf, logits)
    if p.typical_p < 1.0:
        logp = logits.log_softmax(-1)
        probs = logp.exp()
        entropy = -(torch.nan_to_num(logp) * probs).sum()
        shifted = (-logp - entropy).abs()
        sorted_shift, order = torch.sort(shifted)
        cumulative = logits.softmax(-1).gather(0, order).cumsum(-1)
        last = int((cumulative < p.typical_p).sum().clamp(max=logits.shape[-1] - 1))
        remove_sorted = sorted_shift > sorted_shift[last]
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = torch.where(remove, neg_inf, logits)
    return logits


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[n] bool: which rows of logits [n, V] hold no NaN/Inf (rows that may be sampled or reported)."""
    # A row's sum is NaN/Inf iff one of its logits is (or if finite ones overflow float32, which only
    # a broken model reaches). One fast reduction: `isfinite(logits).all(-1)` costs ~15x as much on CPU.
    return torch.isfinite(logits.sum(-1))


def sample(logits: torch.Tensor, rows: list[SampleRow], grammar_mask: GrammarMask | None = None) -> SampleResult:
    """logits [n, V] float32 -> one token per row, its logprob under the model, and top-n alternatives.

    A row with any NaN/Inf logit is not sampled (argmax over NaN picks an arbitrary token, often id 0)
    and is listed in `nonfinite`; the other rows get exactly the tokens they would get without it.
    `grammar_mask` (structured output) sets the logits its rows may not take to -inf, in place, before
    anything else, so penalties, temperature, top-k/p and the reported logprobs all see the constrained
    distribution (as in TGI and vLLM); rows without a grammar are not touched.
    """
    finite = finite_rows(logits)  # before the mask: its -inf entries are not a broken model
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    if bool(finite.all()):  # the hot path: one small reduction and one host read per step
        return _sample(logits, rows)
    flags = finite.tolist()
    keep = [i for i, ok in enumerate(flags) if ok]
    token_ids, logprobs = [-1] * len(rows), [float("nan")] * len(rows)
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    if keep:
        kept = _sample(logits[keep], [rows[i] for i in keep])
        for j, i in enumerate(keep):
            token_ids[i], logprobs[i], top[i] = kept.token_ids[j], kept.logprobs[j], kept.top_tokens[j]
    bad = tuple(i for i, ok in enumerate(flags) if not ok)
    return SampleResult(token_ids=token_ids, logprobs=logprobs, top_tokens=top, nonfinite=bad)


def _sample(logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
    raw_logprobs = logits.log_softmax(-1)
    if any(r.params.repetition_penalty != 1.0 or r.params.frequency_penalty != 0.0 for r in rows):
        logits = _penalise(logits.clone(), rows)
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy:
            continue
        probs = _filter(logits[i], p).softmax(-1)
        u = torch.rand((), generator=row.generator, device="cpu").item()
        cdf = probs.double().cumsum(-1)
        index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)))
        chosen[i] = min(index, probs.shape[-1] - 1)
        if probs[chosen[i]] == 0:  # u landed exactly on an edge next to a filtered-out token
            chosen[i] = int(probs.argmax())
    index = torch.tensor(chosen, dtype=torch.long, device=logits.device)
    token_logprobs = raw_logprobs.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    n_top = max((r.params.top_n_tokens for r in rows), default=0)
    if n_top:
        values, ids = raw_logprobs.topk(n_top, dim=-1)
        for i, row in enumerate(rows):
            k = row.params.top_n_tokens
            top[i] = list(zip(ids[i, :k].tolist(), values[i, :k].tolist()))
    return SampleResult(token_ids=chosen, logprobs=token_logprobs, top_tokens=top)
