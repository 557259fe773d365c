"""Adapter-tagged queues merged into one mixed batch per step (continuous batching, chunked prefill).

Owns the waiting queues (one FIFO per adapter id; None = base model), the running list and the
per-adapter fair-share accounts (engine/fair_share.py). Each step gets a token budget: running
sequences go first (oldest first: decodes cost one token, unfinished prompts continue in chunks),
then waiting sequences are admitted while budget, seats and KV blocks last.

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
long request to end.

Prefill first for adapters under their share (fair policy, `under_share_prefill_first`): an
adapter whose queue fills again while others are backlogged (its demand is served as it comes, a
flood's is not; engine/fair_share.py) has its waiting requests admitted in a step of their own: the
prompts of such adapters only, while sequences are running; those wait that one step (as TGI's
prefill steps make decodes wait). Its time to first token is then the rest of the step under way plus
a short prefill step, not a full step of the floods' decodes and chunks on top of its prompt. Never
two such steps in a row, so running sequences decode at least every other step however many
adapters arrive under their share. They are admitted smallest counter first, each only within one
step of service of the smallest counter, and take seats by the rule above.

`long_prefill_token_threshold` (vLLM's name; 0 = off): no sequence runs more than this many tokens
in one step, so a long prompt is spread over more, shorter steps.

Policy "round_robin", the earlier one, kept for comparison: one admission per adapter queue in
least-recently-served order, admission stops when a head lacks KV blocks, the newest running
sequence is preempted.

Submit-side bounds (either policy; refusals raise OverloadedError at once, nothing is queued):
an adapter holding `max_waiting_per_adapter` waiting requests is refused. Beyond `max_waiting`
waiting in all, an arrival is refused if its adapter already holds its weighted share of
`max_waiting` (max_waiting x weight / the weights of the adapters waiting, itself included);
adapters under their share are still accepted up to `waiting_slack` more, so a flood, from one
adapter or from many, is refused to the floods only.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.block_manager import BlockManager
from engine.config import SCHEDULING_POLICIES
from engine.errors import OverloadedError
from engine.fair_share import FairShare
from engine.sequence import SeqStatus, Sequence

FAIR_WINDOW = 8  # adapters near the smallest counter compared by seats held, per admission
RETRY_AFTER_RANGE_S = (1.0, 60.0)  # the OverloadedError hint, clamped: HTTP Retry-After is whole seconds


class AdapterResidency(Protocol):
    """Where adapters live on the device; the scheduler only pins and unpins."""

    def acquire(self, adapter_id: str) -> int | None:
        """Pin `adapter_id` in a device slot and return it; None if it is not resident yet."""

    def release(self, adapter_id: str, slot: int) -> None: ...


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to run this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens and so samples one."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class ScheduledBatch:
    prefills: list[ScheduledSeq]  # more than one token each (or the first token of a prompt)
    decodes: list[ScheduledSeq]  # exactly one token each, with KV for everything before it
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefills) + len(self.decodes)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


def _tenant(adapter_id: str | None) -> str:
    return "the base model" if adapter_id is None else f"adapter {adapter_id!r}"


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: AdapterResidency,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
        *,
        policy: str = "fair",
        fair_share: FairShare | None = None,
        max_waiting_per_adapter: int | None = None,
        waiting_slack: int = 0,
        under_share_prefill_first: bool = True,
        long_prefill_token_threshold: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {list(SCHEDULING_POLICIES)}, got {policy!r}")
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_waiting_per_adapter = max_waiting_per_adapter
        self.waiting_slack = waiting_slack
        self.policy = policy
        self.under_share_prefill_first = under_share_prefill_first
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self._last_step_prefill_first = False
        self.prefill_first_steps = 0  # steps run for adapters under their share alone (a metric)
        self.fair = fair_share or FairShare()
        self.queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()
        self.running: list[Sequence] = []
        self._num_waiting = 0
        self._running_of: dict[str | None, int] = {}
        self._clock = clock
        self._tiebreak = itertools.count()
        # One step of service (divided by an adapter's weight): how far an admission may be from the
        # smallest counter, whether to pass a head that lacks blocks or to favour fewer seats.
        self._service_slack = max_num_batched_tokens * self.fair.max_token_cost

    # ---- queues -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def oldest_arrival(self) -> float | None:
        """Monotonic arrival time of the oldest waiting request (None when none waits).

        Safe to call without the engine lock: a queue mutated meanwhile at worst gives a slightly
        stale answer, which is fine for an autoscaling signal and never makes the step loop wait.
        """
        try:
            arrivals = [q[0].arrival for q in list(self.queues.values()) if q]
        except (RuntimeError, IndexError):  # a queue changed while being read
            return None
        return min(arrivals) if arrivals else None

    def running_of(self, adapter_id: str | None) -> int:
        return self._running_of.get(adapter_id, 0)

    def add(self, seq: Sequence) -> None:
        """Queue a new request, or raise OverloadedError (nothing queued) if a bound refuses it."""
        self.check_bounds(seq.adapter_id)
        self._enqueue(seq, front=False)

    def check_bounds(self, key: str | None) -> None:
        """Raise OverloadedError if a request for `key` would be refused now (add() checks the same)."""
        held = len(self.queues.get(key, ()))
        bound = self.max_waiting_per_adapter
        if bound is not None and held >= bound:
            self._refuse(key, f"{_tenant(key)} already has {held} requests waiting (max_waiting_per_adapter={bound})")
        if self._num_waiting < self.max_waiting:
            return
        if self._num_waiting >= self.max_waiting + self.waiting_slack:
            self._refuse(key, f"the waiting queue is full ({self._num_waiting} requests)")
        share = self._queue_share(key)
        if held >= share:
            self._refuse(
                key,
                f"the waiting queue is full ({self._num_waiting} requests) and {_tenant(key)} holds {held} of "
                f"them, at least its share ({share:.0f})",
            )

    def _queue_share(self, key: str | None) -> float:
        waiting = set(self.queues) | {key}
        total = sum(self.fair.weight(k) for k in waiting)
        return self.max_waiting * self.fair.weight(key) / total

    def _refuse(self, key: str | None, reason: str) -> None:
        self.fair.record_rejection(key)
        raise OverloadedError(f"{reason}; retry later", retry_after_s=self.retry_after_s(key), adapter_id=key)

    def retry_after_s(self, adapter_id: str | None) -> float:
        """When a retry could find room: the adapter's queue drain time at its recent admission rate."""
        low, high = RETRY_AFTER_RANGE_S
        rate = self.fair.admission_rate(adapter_id, self._clock())
        if rate is None:
            return low
        return min(high, max(low, len(self.queues.get(adapter_id, ())) / rate))

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        key = seq.adapter_id
        queue = self.queues.get(key)
        if queue is None:
            self.fair.became_backlogged(key, self.queues)
            queue = self.queues[key] = deque()
        if front:
            # Preempted work goes back to the head of its own queue; it does not count against the
            # bounds (it was already accepted) so a full queue can never drop it.
            queue.appendleft(seq)
            self.queues.move_to_end(key, last=False)
        else:
            queue.append(seq)
        self._num_waiting += 1

    def _pop_head(self, key: str | None) -> Sequence:
        queue = self.queues[key]
        seq = queue.popleft()
        self._num_waiting -= 1
        if queue:
            self.queues.move_to_end(key)  # least recently served first (the round-robin order)
        else:
            self._drop_queue(key)
        return seq

    def _drop_queue(self, key: str | None) -> None:
        del self.queues[key]
        self.fair.left_backlog(key, backlog_empty=not self.queues)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is and free what it holds (finish or abort)."""
        if seq.status is SeqStatus.WAITING:
            queue = self.queues.get(seq.adapter_id)
            if queue is not None and seq in queue:
                queue.remove(seq)
                self._num_waiting -= 1
                if not queue:
                    self._drop_queue(seq.adapter_id)
        elif seq.status is SeqStatus.RUNNING and seq in self.running:
            self._stop_running(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _start_running(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._running_of[seq.adapter_id] = self._running_of.get(seq.adapter_id, 0) + 1

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        left = self._running_of[seq.adapter_id] - 1
        if left:
            self._running_of[seq.adapter_id] = left
        else:
            del self._running_of[seq.adapter_id]

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        if seq.adapter_slot >= 0 and seq.adapter_id is not None:
            self.adapters.release(seq.adapter_id, seq.adapter_slot)
        seq.adapter_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self._enqueue(seq, front=True)

    def _victim(self) -> Sequence:
        if self.policy == "round_robin":
            return self.running[-1]
        key = max(self._running_of, key=lambda k: (self.fair.service(k), self._running_of[k]))
        return next(s for s in reversed(self.running) if s.adapter_id == key)

    # ---- deadlines ----------------------------------------------------------------------------
    def overdue(
        self, now: float, max_queue_wait_s: float | None, request_timeout_s: float | None
    ) -> tuple[list[Sequence], list[Sequence]]:
        """Sequences past a deadline: (no first token after max_queue_wait_s, past request_timeout_s).

        Only reports (and counts) them; the caller finishes each, which frees what it holds.
        """
        in_queue: list[Sequence] = []
        past_timeout: list[Sequence] = []
        if max_queue_wait_s is None and request_timeout_s is None:
            return in_queue, past_timeout
        for queue in self.queues.values():
            for seq in queue:
                waited = now - seq.arrival
                if max_queue_wait_s is not None and seq.first_token_time is None and waited > max_queue_wait_s:
                    in_queue.append(seq)
                elif request_timeout_s is not None and waited > request_timeout_s:
                    past_timeout.append(seq)
                elif seq.num_preemptions == 0:
                    break  # preempted work sits at the front; the rest arrived later and was never admitted
        if request_timeout_s is not None:
            past_timeout += [s for s in self.running if now - s.arrival > request_timeout_s]
        for seq in in_queue:
            self.fair.record_timeout(seq.adapter_id, in_queue=True)
        for seq in past_timeout:
            self.fair.record_timeout(seq.adapter_id, in_queue=False)
        return in_queue, past_timeout

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        if self._prefill_first_due():
            first, seat_preempted = self._admit_under_share()
            if first:
                self._last_step_prefill_first = True
                self.prefill_first_steps += 1
                return ScheduledBatch(prefills=first, decodes=[], preempted=seat_preempted)
        self._last_step_prefill_first = False
        budget = self.max_num_batched_tokens
        chosen: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop to make room
                continue
            n = self._chunk(seq, budget)
            while not self.blocks.ensure(seq.request_id, seq.num_computed + n):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim)
                budget += self._unchoose(chosen, victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chosen.append(ScheduledSeq(seq, n))
                budget -= n
        for item in chosen:
            self.fair.charge(item.seq, item.num_tokens)

        if not preempted:
            if self.policy == "fair":
                self._admit_fair(budget, chosen, preempted)
            else:
                self._admit_round_robin(budget, chosen)

        prefills = [s for s in chosen if not (s.num_tokens == 1 and s.seq.num_computed > 0)]
        decodes = [s for s in chosen if s.num_tokens == 1 and s.seq.num_computed > 0]
        return ScheduledBatch(prefills=prefills, decodes=decodes, preempted=preempted)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` runs this step: what it has left, within the budget and long_prefill_token_threshold."""
        n = min(seq.remaining, budget)
        cap = self.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _head_fits(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the free blocks hold a waiting head's first `num_tokens`; for a preempted one, all the
        tokens it had and the next (fair policy). Its victim is chosen by counter, and counters move:
        two sequences that cannot fit together would otherwise take turns preempting each other, and
        neither finish. Back only when it can run to where it was, it waits until one of them ends."""
        need = seq.num_tokens + 1 if seq.num_preemptions else seq.num_computed + num_tokens
        return self.blocks.extra_blocks_needed(seq.request_id, need) <= self.blocks.num_free

    def _prefill_first_due(self) -> bool:
        return (
            self.policy == "fair" and self.under_share_prefill_first and not self._last_step_prefill_first
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
                seq = self.queues[key][0]
                n = self._chunk(seq, budget)
                if not self._head_fits(seq, n):
                    break  # its head does not fit now: the ordinary steps handle it
                victim = None
                if len(self.running) >= self.max_num_seqs:
                    victim = self._seat_victim(key)
                    if victim is None:
                        break
                if not self._start(key, n, chosen, now):
                    break  # adapter not on the device yet (nobody was preempted for it)
                budget -= n
                if victim is not None:  # chosen before the start, so never one of `key`'s own sequences
                    self._preempt(victim)
                    preempted.append(victim)
                    budget += self._unchoose(chosen, victim)
        return chosen, preempted

    @staticmethod
    def _unchoose(chosen: list[ScheduledSeq], seq: Sequence) -> int:
        """Drop `seq` from this step's batch if it was already in it; the tokens it had go back to the budget."""
        for i, item in enumerate(chosen):
            if item.seq is seq:
                del chosen[i]
                return item.num_tokens
        return 0

    def _rank(self, key: str | None) -> tuple[float, int, float, int, str | None]:
        head = self.queues[key][0]
        return (self.fair.service(key), self.running_of(key), head.arrival, next(self._tiebreak), key)

    def _admit_fair(self, budget: int, chosen: list[ScheduledSeq], preempted: list[Sequence]) -> int:
        """Admit from the backlogged adapter with the smallest counter, again and again, while room lasts."""
        now = self._clock()
        heap = [self._rank(key) for key in self.queues]
        heapq.heapify(heap)
        kv_floor: float | None = None  # counter of the most deserving adapter whose head lacks blocks
        while heap and budget > 0:
            service, _, _, _, key = self._pop_fairest(heap)
            if kv_floor is not None and service > kv_floor + self._service_slack / self.fair.weight(key):
                continue  # far enough ahead of the adapter waiting for blocks: leave the blocks to it
            if len(self.running) >= self.max_num_seqs:
                victim = self._seat_victim(key)
                if victim is None:
                    break
                self._preempt(victim)
                preempted.append(victim)
                budget += self._unchoose(chosen, victim)
            seq = self.queues[key][0]
            n = self._chunk(seq, budget)
            if not self._head_fits(seq, n):
                if kv_floor is None:
                    kv_floor = service
                continue  # its head does not fit: the others go on
            if not self._start(key, n, chosen, now):
                continue  # adapter not on the device yet: the others go on
            budget -= n
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

    def _admit_round_robin(self, budget: int, chosen: list[ScheduledSeq]) -> int:
        """Admit one sequence per adapter queue per round, while budget, seats and blocks last.

        Queues are kept in least-recently-served order: a queue that just admitted one moves to the
        back, so every adapter gets a turn before any gets a second one, across steps too.
        """
        now = self._clock()
        blocked: set[str | None] = set()  # queues whose adapter is not resident yet
        progress = True
        while progress:
            progress = False
            for key in list(self.queues):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    return budget
                if key in blocked:
                    continue
                seq = self.queues[key][0]
                n = self._chunk(seq, budget)
                if self.blocks.extra_blocks_needed(seq.request_id, seq.num_computed + n) > self.blocks.num_free:
                    return budget  # out of KV: admit nothing more this step
                if not self._start(key, n, chosen, now):  # adapter not on the device yet: others go on
                    blocked.add(key)
                    continue
                budget -= n
                progress = True
        return budget

    def _start(self, key: str | None, num_tokens: int, chosen: list[ScheduledSeq], now: float) -> bool:
        """Move the head of `key`'s queue to running with `num_tokens` this step; False if its adapter is not resident."""
        seq = self.queues[key][0]
        slot = -1
        if seq.adapter_id is not None:
            got = self.adapters.acquire(seq.adapter_id)
            if got is None:
                return False
            slot = got
        self.blocks.ensure(seq.request_id, seq.num_computed + num_tokens)
        self._pop_head(key)
        self.fair.admitted(key)
        if seq.num_preemptions == 0:
            self.fair.record_admission(key, now - seq.arrival, now)
        seq.adapter_slot = slot
        self._start_running(seq)
        chosen.append(ScheduledSeq(seq, num_tokens))
        self.fair.charge(seq, num_tokens)
        return True

    def has_work(self) -> bool:
        return bool(self.running) or self._num_waiting > 0
