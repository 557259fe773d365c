"""Fair admission: which waiting head runs next, which running sequence gives up its seat or its blocks.

Policy "fair" (the default; S-LoRA's Virtual Token Counter): every admission goes to the backlogged
adapter with the smallest weighted service counter; counters within one step of service of it
(max_num_batched_tokens x the larger token cost, over the adapter's weight) count as equal, and
among those the adapter holding the fewest seats per weight goes first. An adapter whose head lacks
KV blocks is passed over, so it does not stop the others, but they may run ahead of it by at most
one step of service; then admission waits for blocks to free up for it, so it cannot starve. When
blocks run out mid-step the victim is the newest sequence of the running adapter with the largest
counter: the one most over its share; it is admitted again only when the free blocks hold all it had
(counters move, and two sequences that cannot fit together would otherwise take turns preempting
each other without end). When every seat is taken, the adapter next in that order
takes one from the adapter holding the most seats per weight, if that one was served about as much
or more and keeps at least as many seats per weight (its newest sequence is preempted, as in vLLM's
priority scheduling): a light adapter beside floods waits a step for a seat, not for a flood's
long request to end. The seat is taken only once the admission is certain (the head fits in the
blocks free plus those the seat's holder frees, and its adapter is pinned), and a sequence that gave
up its seat is not admitted again in the same step: it would be both in the batch and preempted.
Its adapter is passed over for the step like one whose head lacks blocks.

Prefill first for adapters under their share (fair policy, `under_share_prefill_first`): an
adapter whose queue fills again while others are backlogged (its demand is served as it comes, a
flood's is not; engine/fair_share.py) has its waiting requests admitted in a step of their own: the
prompts of such adapters only, while sequences are running; those wait that one step (as TGI's
prefill steps make decodes wait). Its time to first token is then the rest of the step under way plus
a short prefill step, not a full step of the floods' decodes and chunks on top of its prompt. Never
two such steps in a row, so running sequences decode at least every other step however many
adapters arrive under their share. They are admitted smallest counter first, each only within one
step of service of the smallest counter, and take seats by the rule above.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from engine.prefix_cache import NO_HIT, PrefixHit
from engine.running_batch import RunningBatch
from engine.scheduled_batch import ScheduledSeq
from engine.sequence import Sequence

FAIR_WINDOW = 8  # adapters near the smallest counter compared by seats held, per admission


class FairAdmission(RunningBatch):
    """The running batch (RunningBatch) with the fair policy's admission and victim choice."""

    def __init__(self, *, under_share_prefill_first: bool, **running_batch: Any) -> None:
        super().__init__(**running_batch)
        self.under_share_prefill_first = under_share_prefill_first
        self._last_step_prefill_first = False
        self.prefill_first_steps = 0  # steps run for adapters under their share alone (a metric)
        self._tiebreak = itertools.count()
        # One step of service (divided by an adapter's weight): how far an admission may be from the
        # smallest counter, whether to pass a head that lacks blocks or to favour fewer seats.
        self._service_slack = self.max_num_batched_tokens * self.fair.max_token_cost

    def _fair_victim(self) -> Sequence:
        """The sequence to preempt when blocks run out: the newest of the running adapter with the largest counter."""
        key = max(self._running_of, key=lambda k: (self.fair.service(k), self._running_of[k]))
        return next(s for s in reversed(self.running) if s.adapter_id == key)

    def _head_fits(
        self, seq: Sequence, num_tokens: int, hit: PrefixHit = NO_HIT, give_way: Sequence | None = None
    ) -> bool:
        """Whether the free blocks hold a waiting head's first `num_tokens` past its prefix hit; for a preempted one, all the
        tokens it had and the next (fair policy). Its victim is chosen by counter, and counters move:
        two sequences that cannot fit together would otherwise take turns preempting each other, and
        neither finish. Back only when it can run to where it was, it waits until one of them ends.

        With `give_way` (the sequence that would give up its seat to it), the blocks that would free count too.
        """
        need = seq.num_tokens + 1 if seq.num_preemptions else hit.num_tokens + num_tokens
        if give_way is not None:  # whole blocks off the need: the same count off the blocks it asks for
            need -= self._blocks_freed_by_preempting(give_way, hit) * self.blocks.block_size
        return self.blocks.fits(seq.request_id, need, hit)

    def _prefill_first_due(self) -> bool:
        return (
            self.under_share_prefill_first and not self._last_step_prefill_first
            and bool(self.running)  # with nothing running, an ordinary step has nothing to make them wait for
            and any(self.fair.under_share(key) for key in self.queues)
        )

    def _admit_under_share(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """The step of their own for adapters under their share: their waiting requests, adapter by
        adapter in fair order, while each stays within one step of service of the smallest counter and
        budget, seats (taken as in _admit_fair) and blocks last. Running sequences are not in it."""
        now = self._clock()
        keys = sorted((key for key in self.queues if self.fair.under_share(key)), key=self._rank)
        budget = self.max_num_batched_tokens
        chosen: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        for key in keys:
            while key in self.queues and budget > 0:
                smallest = min(self.fair.service(k) for k in self.queues)
                if self.fair.service(key) > smallest + self._service_slack / self.fair.weight(key):
                    break  # served enough for now: the ordinary order decides the rest
                victim = None
                if len(self.running) >= self.max_num_seqs:
                    victim = self._seat_victim(key)
                    if victim is None:
                        break
                seq = self.queues[key][0]
                hit = self._lookup(seq)
                n = self._chunk(seq, budget, hit)
                if seq in preempted or not self._head_fits(seq, n, hit, victim):
                    break  # its head gave up its seat in this step, or does not fit now: the ordinary steps handle it
                if not self._start(key, n, chosen, now, hit, give_way=victim):
                    break  # adapter not on the device yet (nobody was preempted for it)
                budget -= n
                if victim is not None:  # chosen before the start, so never one of `key`'s own sequences
                    preempted.append(victim)
                    budget += self._unchoose(chosen, victim)
        return chosen, preempted

    def _rank(self, key: str | None) -> tuple[float, int, float, int, str | None]:
        head = self.queues[key][0]
        return (self.fair.service(key), self.running_of(key), head.arrival, next(self._tiebreak), key)

    def _admit_fair(self, budget: int, chosen: list[ScheduledSeq], preempted: list[Sequence]) -> int:
        """Admit from the backlogged adapter with the smallest counter, again and again, while room lasts."""
        now = self._clock()
        heap = [self._rank(key) for key in self.queues]
        heapq.heapify(heap)
        # Counter of the most deserving adapter passed over because its head cannot run this step.
        passed_floor: float | None = None
        while heap and budget > 0:
            service, _, _, _, key = self._pop_fairest(heap)
            if passed_floor is not None and service > passed_floor + self._service_slack / self.fair.weight(key):
                continue  # far enough ahead of the adapter passed over: leave the blocks to it
            victim = None
            if len(self.running) >= self.max_num_seqs:
                victim = self._seat_victim(key)
                if victim is None:
                    break
            seq = self.queues[key][0]
            hit = self._lookup(seq)
            n = self._chunk(seq, budget, hit)
            # A head preempted in this step stays out until the next (it is in this batch's `preempted`);
            # one lacking blocks waits for them. The smallest such counter bounds the others, not the
            # first met: the seat order can meet a larger one first.
            if seq in preempted or not self._head_fits(seq, n, hit, victim):
                passed_floor = service if passed_floor is None else min(passed_floor, service)
                continue  # the others go on
            # The seat is given up only once the head is pinned: a seat given up for nothing is lost work.
            if not self._start(key, n, chosen, now, hit, give_way=victim):
                continue  # adapter not on the device yet: the others go on
            budget -= n
            if victim is not None:
                preempted.append(victim)
                budget += self._unchoose(chosen, victim)
            if key in self.queues:
                heapq.heappush(heap, self._rank(key))
        return budget

    def _pop_fairest(self, heap: list[tuple[float, int, float, int, str | None]]) -> tuple[float, int, float, int, str | None]:
        """Pop the next adapter to admit: among those within one step of service of the smallest counter
        (at most FAIR_WINDOW of them), the one holding the fewest seats per weight.

        Counters that close are as fair as each other (the admission rule's bound allows it anyway);
        seats decide, so a light adapter whose last request is still charging its counter a few
        tokens a step is not left behind a flood that holds most of the seats.
        """
        first = heapq.heappop(heap)
        window = [first]
        while heap and len(window) < FAIR_WINDOW and heap[0][0] <= first[0] + self._service_slack / self.fair.weight(heap[0][-1]):
            window.append(heapq.heappop(heap))
        best = min(window, key=lambda r: (self.running_of(r[-1]) / self.fair.weight(r[-1]), r))
        for rank in window:
            if rank is not best:
                heapq.heappush(heap, rank)
        return best

    def _seat_victim(self, key: str | None) -> Sequence | None:
        """The sequence to give up its seat to `key` (next in fair order while every seat is taken), if any.

        Only an adapter served about as much as `key` or more (within one step of service) gives one
        up, and only if it still holds at least as many seats per weight as `key` afterwards: each
        move narrows the gap in seats, so seats cannot bounce back and forth. Its newest sequence
        goes: it loses the least work.
        """
        weight = self.fair.weight
        after = (self._running_of.get(key, 0) + 1) / weight(key)
        floor = self.fair.service(key) - self._service_slack / weight(key)
        holders = [
            k for k, n in self._running_of.items()
            if k != key and (n - 1) / weight(k) >= after and self.fair.service(k) >= floor
        ]
        if not holders:
            return None
        victim_key = max(holders, key=lambda k: (self._running_of[k] / weight(k), self.fair.service(k)))
        return next(s for s in reversed(self.running) if s.adapter_id == victim_key)
