"""Per-adapter service accounting: the virtual token counters fair admission orders by, and their metrics.

S-LoRA's Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024, arXiv 2401.00588). Every tenant (an adapter id; None = the base model) has a counter of
the service it received: prompt tokens x prefill_cost + generated tokens x decode_cost, divided by
its weight. The scheduler admits from the backlogged tenant with the smallest counter, so while two
tenants are both backlogged their weight-normalised service differs by a bounded amount, however
much either sends. A tenant whose queue goes from empty to non-empty is lifted to the smallest
counter among the backlogged tenants (to where the last one left when there are none): time spent
idle banks no credit, and service received is never forgiven.

A tenant whose queue fills again while others are backlogged is under its share: its own demand was
served as it came, while theirs exceeded what they got (a flood keeps a queue). It stays so until its
next admission; the scheduler gives such tenants' new requests their first step early.

Tokens are charged when the scheduler puts them in a batch, each position of a sequence once: the
recompute of a preempted sequence is the scheduler's doing, not service its tenant received.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.sequence import Sequence

ADMISSION_RATE_WINDOW = 16  # recent admissions per tenant kept for the retry-after estimate


@dataclass
class TenantAccount:
    """One tenant's counter and what it was served; owned and mutated by FairShare only."""

    weight: float
    service: float = 0.0  # the virtual token counter: weighted tokens / weight
    prefill_tokens: int = 0  # prompt positions run through the model (first time only)
    decode_tokens: int = 0  # generated positions run through the model (first time only)
    admitted: int = 0  # requests admitted for the first time
    rejected: int = 0  # refused at submit (OverloadedError)
    queue_timeouts: int = 0
    request_timeouts: int = 0
    queue_wait_s_sum: float = 0.0  # arrival -> first admission, over `admitted` requests
    queue_wait_s_max: float = 0.0
    # Its queue filled again while others were backlogged, and it was not admitted since.
    under_share: bool = False
    recent_admissions: deque[float] = field(default_factory=lambda: deque(maxlen=ADMISSION_RATE_WINDOW))


class FairShare:
    def __init__(
        self, weights: Mapping[str, float] | None = None, prefill_cost: float = 1.0, decode_cost: float = 2.0
    ) -> None:
        # Config names the base model "" (as Engine.stats() does); the scheduler calls it None.
        self._weights = {(key or None): float(w) for key, w in (weights or {}).items()}
        self.prefill_cost = prefill_cost
        self.decode_cost = decode_cost
        self.accounts: dict[str | None, TenantAccount] = {}
        self._floor = 0.0  # the counter of the last tenant to leave an otherwise empty backlog

    @property
    def max_token_cost(self) -> float:
        return max(self.prefill_cost, self.decode_cost)

    def account(self, key: str | None) -> TenantAccount:
        acct = self.accounts.get(key)
        if acct is None:
            acct = self.accounts[key] = TenantAccount(weight=self._weights.get(key, 1.0))
        return acct

    def weight(self, key: str | None) -> float:
        return self.account(key).weight

    def service(self, key: str | None) -> float:
        return self.account(key).service

    # ---- the counters -------------------------------------------------------------------------
    def became_backlogged(self, key: str | None, backlogged: Iterable[str | None]) -> None:
        """`key`'s queue just went from empty to non-empty; `backlogged` are the tenants already waiting."""
        levels = [self.account(k).service for k in backlogged if k != key]
        acct = self.account(key)
        # Under its share only next to a backlog: with no one else waiting there is no share to be under.
        acct.under_share = bool(levels)
        acct.service = max(acct.service, min(levels) if levels else self._floor)

    def left_backlog(self, key: str | None, backlog_empty: bool) -> None:
        """`key`'s queue just emptied; when no tenant waits any more, remember where the last one was."""
        acct = self.account(key)
        acct.under_share = False
        if backlog_empty:
            self._floor = max(self._floor, acct.service)

    def under_share(self, key: str | None) -> bool:
        """Whether `key`'s queue filled again while others were backlogged and it has not been admitted since."""
        return self.account(key).under_share

    def admitted(self, key: str | None) -> None:
        """`key` had a request admitted (first time or after preemption): it is served again, not behind."""
        self.account(key).under_share = False

    def charge(self, seq: Sequence, num_tokens: int) -> None:
        """Charge the `num_tokens` positions from `seq.num_computed` that were never charged before."""
        end = seq.num_computed + num_tokens
        if end <= seq.num_charged:
            return
        start, prompt_len = seq.num_charged, len(seq.prompt_ids)
        prefill = max(0, min(end, prompt_len) - start)
        decode = end - start - prefill
        seq.num_charged = end
        acct = self.account(seq.adapter_id)
        acct.prefill_tokens += prefill
        acct.decode_tokens += decode
        acct.service += (prefill * self.prefill_cost + decode * self.decode_cost) / acct.weight

    # ---- metrics ------------------------------------------------------------------------------
    def record_admission(self, key: str | None, queue_wait_s: float, now: float) -> None:
        acct = self.account(key)
        acct.admitted += 1
        acct.queue_wait_s_sum += queue_wait_s
        acct.queue_wait_s_max = max(acct.queue_wait_s_max, queue_wait_s)
        acct.recent_admissions.append(now)

    def record_rejection(self, key: str | None) -> None:
        self.account(key).rejected += 1

    def record_timeout(self, key: str | None, in_queue: bool) -> None:
        acct = self.account(key)
        if in_queue:
            acct.queue_timeouts += 1
        else:
            acct.request_timeouts += 1

    def admission_rate(self, key: str | None, now: float) -> float | None:
        """Requests per second admitted for `key` lately; None before two admissions."""
        times = self.account(key).recent_admissions
        if len(times) < 2:
            return None
        return (len(times) - 1) / max(now - times[0], 1e-3)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per tenant ("" = the base model): weight, counter, tokens, admissions, rejections, waits."""
        return {
            (key or ""): {
                "weight": a.weight,
                "service": a.service,
                "prefill_tokens": a.prefill_tokens,
                "decode_tokens": a.decode_tokens,
                "admitted": a.admitted,
                "rejected": a.rejected,
                "queue_timeouts": a.queue_timeouts,
                "request_timeouts": a.request_timeouts,
                "queue_wait_s_sum": a.queue_wait_s_sum,
                "queue_wait_s_max": a.queue_wait_s_max,
            }
            for key, a in self.accounts.items()
        }
