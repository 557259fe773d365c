"""Per-request sampling over one batch of logits, vectorised on the device; one host read per step.

Each row has its own parameters. Processing follows Hugging Face `generate`'s order: repetition
and frequency penalties on the raw logits, then temperature, top-k, top-p and typical-p. Greedy rows
take the argmax of the penalised logits. Rows with a grammar (structured output) are masked to the
tokens it allows before all of that.

Every step runs as batched tensor ops over the rows that use a feature (temperature, top-k, top-p,
typical-p and the penalties are per-row tensors), and the results come back in one device-to-host read
(`DeviceSample.read`: tokens, their logprobs, the finite flags and the top-n alternatives in one tensor).
Seeds: a sampled row draws one uniform number from its own torch.Generator on the host (seeded per
request, as before), so a seed gives the same tokens whatever else is in the batch and the same tokens as
the earlier row-by-row sampler; vLLM v1 keeps per-request generators the same way. The draws are host
work and travel to the device with the step's other inputs: no sync.

Penalties need each row's history: `PenaltyHistory` keeps it on the device per table row of
`engine.input_batch` (which tokens the sequence has seen, how often it generated each), built once when a
sequence takes a row and updated with each sampled token on the device. A caller without one (tests) can
pass the history as lists in `SampleRow` instead.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.grammar_mask import GrammarMask
from engine.input_batch import upload
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    history: Seq[int] = ()  # prompt + generated tokens (repetition penalty), when no PenaltyHistory is given
    generated: Seq[int] = ()  # generated tokens only (frequency penalty), likewise


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # -1 for a row in `nonfinite`
    logprobs: list[float]  # nan for a row in `nonfinite`
    top_tokens: list[list[tuple[int, float]]]
    nonfinite: tuple[int, ...] = ()  # rows whose logits held NaN/Inf: not sampled, the caller fails them


@dataclass(frozen=True)
class Penalties:
    """Penalty inputs of the rows that ask for one: batch rows, seen-token mask and generated-token counts."""

    rows: list[int]  # batch rows with a repetition or frequency penalty
    seen: torch.Tensor  # [len(rows), V] bool: token in the prompt or the output so far
    counts: torch.Tensor  # [len(rows), V] float32: times the token was generated


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[n] bool: which rows of logits [n, V] hold no NaN/Inf (rows that may be sampled or reported)."""
    # A row's sum is NaN/Inf iff one of its logits is (or if finite ones overflow float32, which only
    # a broken model reaches). One fast reduction: `isfinite(logits).all(-1)` costs ~15x as much on CPU.
    return torch.isfinite(logits.sum(-1))


class PenaltyHistory:
    """Per table row of the input batch: the tokens its sequence has seen and how often it generated each.

    Allocated on the first sequence with a penalty; a row is (re)built from the sequence's token lists
    when it gets a new holder, and grows by one token per sampled step on the device.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self._holder: dict[int, Sequence] = {}

    def _grow(self, rows: int) -> None:
        if rows <= self.seen.shape[0]:
            return
        rows = max(rows, 2 * self.seen.shape[0])
        seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        seen[: self.seen.shape[0]] = self.seen
        counts[: self.counts.shape[0]] = self.counts
        self.seen, self.counts = seen, counts

    def gather(self, batch_rows: list[int], seqs: list[Sequence], table_rows: list[int]) -> Penalties:
        """The penalty inputs of `batch_rows`, whose sequences `seqs` hold `table_rows` of the input batch."""
        self._grow(max(table_rows) + 1)
        for seq, row in zip(seqs, table_rows):
            if self._holder.get(row) is not seq:  # a new holder: its history, once
                self._holder[row] = seq
                self.seen[row].zero_()
                self.counts[row].zero_()
                history = upload(seq.prompt_ids + seq.output_ids, self.device)
                self.seen[row].index_fill_(0, history, True)
                if seq.output_ids:
                    generated = history[len(seq.prompt_ids) :]
                    self.counts[row].index_add_(0, generated, torch.ones_like(generated, dtype=torch.float32))
        index = upload(table_rows, self.device)
        return Penalties(batch_rows, self.seen.index_select(0, index), self.counts.index_select(0, index))

    def record(self, table_rows: list[int], tokens: torch.Tensor) -> None:
        """Add this step's sampled tokens (device [len(table_rows)] int64) to their rows' histories."""
        index = upload(table_rows, self.device)
        self.seen.index_put_((index, tokens), torch.ones_like(tokens, dtype=torch.bool))
        self.counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)


def _penalties_from_lists(rows: list[SampleRow], vocab_size: int, device: torch.device) -> Penalties | None:
    batch_rows = [i for i, r in enumerate(rows) if has_penalty(r.params)]
    if not batch_rows:
        return None
    seen = torch.zeros(len(batch_rows), vocab_size, dtype=torch.bool, device=device)
    counts = torch.zeros(len(batch_rows), vocab_size, dtype=torch.float32, device=device)
    for j, i in enumerate(batch_rows):
        if rows[i].history:
            seen[j].index_fill_(0, upload(list(rows[i].history), device), True)
        if rows[i].generated:
            ids = upload(list(rows[i].generated), device)
            counts[j].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
    return Penalties(batch_rows, seen, counts)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    """[n, 1] float32 per-row parameters on the device (no host sync)."""
    t = torch.tensor(values, dtype=torch.float32, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True).unsqueeze(1)


def _penalise(logits: torch.Tensor, rows: list[SampleRow], pen: Penalties) -> torch.Tensor:
    """Repetition then frequency penalty on the rows that have one (a copy; the raw logits stay)."""
    logits = logits.clone()
    index = upload(pen.rows, logits.device)
    picked = logits.index_select(0, index)
    rep = _floats([rows[i].params.repetition_penalty for i in pen.rows], logits.device)
    freq = _floats([rows[i].params.frequency_penalty for i in pen.rows], logits.device)
    penalised = torch.where(picked < 0, picked * rep, picked / rep)
    picked = torch.where(pen.seen, penalised, picked)
    picked = picked - freq * pen.counts
    logits.index_copy_(0, index, picked)
    return logits


def _top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep each row's top ks[i] logits (0 or >= V: all of them)."""
    vocab = x.shape[-1]
    active = [k if 0 < k < vocab else 0 for k in ks]
    kmax = max(active)
    if kmax == 0:
        return x
    kth_index = upload([max(k - 1, 0) for k in active], x.device).unsqueeze(1)
    kth = torch.topk(x, kmax, dim=-1).values.gather(1, kth_index)
    off = upload([int(k == 0) for k in active], x.device).bool().unsqueeze(1)
    # masked_fill with a Python scalar: a device constant made with torch.tensor would be a blocking copy
    kth = kth.masked_fill(off, float("-inf"))
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(x: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = torch.sort(x, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= (1 - _floats(top_p, x.device))
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return x.masked_fill(remove, float("-inf"))


def _typical_p(x: torch.Tensor, typical_p: list[float]) -> torch.Tensor:
    logp = x.log_softmax(-1)
    probs = logp.exp()
    entropy = -(torch.nan_to_num(logp) * probs).sum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted, dim=-1)
    cumulative = x.softmax(-1).gather(1, order).cumsum(-1)
    last = (cumulative < _floats(typical_p, x.device)).sum(-1, keepdim=True).clamp(max=x.shape[-1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return x.masked_fill(remove, float("-inf"))


def _subset(x: torch.Tensor, rows: list[int], fn, *args) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """fn over the listed rows of x only (rows not asking for a filter skip its cost), others as they were."""
    if len(rows) == x.shape[0]:
        return fn(x, *args)
    index = upload(rows, x.device)
    return x.index_copy(0, index, fn(x.index_select(0, index), *args))


def _sample_rows(logits: torch.Tensor, rows: list[SampleRow], sampled: list[int]) -> torch.Tensor:
    """Tokens of the non-greedy rows `sampled`: filters, then inverse-CDF with each row's own uniform draw."""
    dev = logits.device
    params = [rows[i].params for i in sampled]
    x = logits.index_select(0, upload(sampled, dev)) / _floats([p.temperature for p in params], dev)
    if any(0 < p.top_k < x.shape[-1] for p in params):
        x = _top_k(x, [p.top_k for p in params])
    with_p = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if with_p:
        x = _subset(x, with_p, _top_p, [params[j].top_p for j in with_p])
    with_typical = [j for j, p in enumerate(params) if p.typical_p < 1.0]
    if with_typical:
        x = _subset(x, with_typical, _typical_p, [params[j].typical_p for j in with_typical])
    probs = x.softmax(-1)
    cdf = probs.double().cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled])  # host: each row's stream
    uniforms = draws.double().pin_memory() if dev.type == "cuda" else draws.double()
    target = uniforms.to(dev, non_blocking=True).unsqueeze(1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target).clamp(max=probs.shape[-1] - 1)
    # u landed exactly on an edge next to a filtered-out token: the most likely token instead
    zero = probs.gather(1, index) == 0
    return torch.where(zero, probs.argmax(-1, keepdim=True), index).squeeze(1)


@dataclass(frozen=True)
class DeviceSample:
    """A step's sampled tokens still on the device; `read` brings everything back in one transfer."""

    tokens: torch.Tensor  # [n] int64
    packed: torch.Tensor  # [n * (3 + 2 * top)] float64: tokens, logprobs, finite flags, top ids, top logprobs
    num_rows: int
    top_n: list[int]  # per row

    def read(self) -> SampleResult:
        values = self.packed.tolist()  # the one host sync of the step
        n = self.num_rows
        token_ids = [int(t) for t in values[:n]]
        logprobs = values[n : 2 * n]
        finite = values[2 * n : 3 * n]
        width = max(self.top_n, default=0)
        top: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        if width:
            ids, lps = values[3 * n : 3 * n + n * width], values[3 * n + n * width :]
            for i, k in enumerate(self.top_n):
                top[i] = [(int(ids[i * width + j]), lps[i * width + j]) for j in range(k)]
        bad = tuple(i for i, ok in enumerate(finite) if not ok)
        for i in bad:
            token_ids[i], logprobs[i], top[i] = -1, float("nan"), []
        return SampleResult(token_ids=token_ids, logprobs=logprobs, top_tokens=top, nonfinite=bad)


def sample_on_device(
    logits: torch.Tensor,
    rows: list[SampleRow],
    grammar_mask: GrammarMask | None = None,
    penalties: Penalties | None = None,
) -> DeviceSample:
    """logits [n, V] float32 -> one token per row, its logprob under the model, and top-n alternatives.

    A row with any NaN/Inf logit is reported in `nonfinite` (its token is not used; argmax over NaN picks
    an arbitrary token, often id 0); the other rows get exactly the tokens they would get without it,
    since every op is row-wise. `grammar_mask` (structured output) sets the logits its rows may not take
    to -inf, in place, before anything else, so penalties, temperature, top-k/p and the reported logprobs
    all see the constrained distribution (as in TGI and vLLM); rows without a grammar are not touched.
    `penalties` defaults to the rows' own history lists.
    """
    finite = finite_rows(logits)  # before the mask: its -inf entries are not a broken model
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    raw_logprobs = logits.log_softmax(-1)
    if penalties is None and any(has_penalty(r.params) for r in rows):
        penalties = _penalties_from_lists(rows, logits.shape[-1], logits.device)
    scored = _penalise(logits, rows, penalties) if penalties is not None else logits
    tokens = scored.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens = tokens.index_copy(0, upload(sampled, logits.device), _sample_rows(scored, rows, sampled))
    token_logprobs = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    parts = [tokens.double(), token_logprobs.double(), finite.double()]
    top_n = [r.params.top_n_tokens for r in rows]
    width = max(top_n, default=0)
    if width:
        values, ids = raw_logprobs.topk(width, dim=-1)
        parts += [ids.reshape(-1).double(), values.reshape(-1).double()]
    return DeviceSample(tokens, torch.cat(parts), len(rows), top_n)


def sample(
    logits: torch.Tensor,
    rows: list[SampleRow],
    grammar_mask: GrammarMask | None = None,
    penalties: Penalties | None = None,
) -> SampleResult:
    """`sample_on_device`, read back (one host sync)."""
    return sample_on_device(logits, rows, grammar_mask, penalties).read()
