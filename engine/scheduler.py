"""Adapter-tagged queues merged into one mixed batch per step (continuous batching, chunked prefill).

Builds on the waiting queues (one FIFO per adapter id; None = base model), the running list and the
per-adapter fair-share accounts (engine/fair_share.py). Each step gets a token budget: running
sequences go first (oldest first: decodes cost one token, unfinished prompts continue in chunks),
then waiting sequences are admitted while budget, seats and KV blocks last.

Policy "fair" (the default; S-LoRA's Virtual Token Counter), its admission order, seat-taking,
victim choice and prefill-first steps for adapters under their share: engine/fair_admission.py.

Policy "round_robin", the earlier one, kept for comparison: one admission per adapter queue in
least-recently-served order, admission stops when a head lacks KV blocks, the newest running
sequence is preempted.

The running sequences and what they hold (blocks, prefix hits, adapter slots, chunking):
engine/running_batch.py. The waiting queues themselves and their submit-side bounds:
engine/adapter_queues.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.config import SCHEDULING_POLICIES
from engine.fair_admission import FairAdmission
from engine.fair_share import FairShare
from engine.running_batch import AdapterResidency
from engine.scheduled_batch import ScheduledBatch, ScheduledSeq  # the runner imports them from here too
from engine.sequence import SeqStatus, Sequence


class Scheduler(FairAdmission):
    """The adapter queues and the running batch (FairAdmission and below): one ScheduledBatch per step."""

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
        super().__init__(
            blocks=blocks, adapters=adapters, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_token_threshold=long_prefill_token_threshold, fair=fair_share or FairShare(),
            max_waiting=max_waiting, max_waiting_per_adapter=max_waiting_per_adapter, waiting_slack=waiting_slack,
            clock=clock, under_share_prefill_first=under_share_prefill_first,
        )
        self.policy = policy

    def _victim(self) -> Sequence:
        return self.running[-1] if self.policy == "round_robin" else self._fair_victim()

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
        for seq in self.running:  # blocks the last step completed become reusable before anyone is admitted
            self.blocks.cache_computed(seq)
        if self.policy == "fair" and self._prefill_first_due():
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
                hit = self._lookup(seq)
                n = self._chunk(seq, budget, hit)
                if not self.blocks.fits(seq.request_id, hit.num_tokens + n, hit):
                    return budget  # out of KV: admit nothing more this step
                if not self._start(key, n, chosen, now, hit):  # adapter not on the device yet: others go on
                    blocked.add(key)
                    continue
                budget -= n
                progress = True
        return budget
