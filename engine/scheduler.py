"""Adapter-tagged queues merged into one mixed batch per step (continuous batching, chunked prefill).

Owns the waiting queues (one FIFO per adapter id; None = base model) and the running list. Each
step gets a token budget: running sequences go first (oldest first: decodes cost one token,
unfinished prompts continue in chunks), then waiting sequences are admitted round-robin across
adapter queues so no adapter starves another. When KV blocks run out the newest running sequence
is preempted (its blocks freed, recomputed later from its prompt and the tokens it already made).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from engine.block_manager import BlockManager
from engine.errors import OverloadedError
from engine.sequence import SeqStatus, Sequence


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


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: AdapterResidency,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()
        self.running: list[Sequence] = []
        self._num_waiting = 0

    # ---- queues -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def add(self, seq: Sequence) -> None:
        if self._num_waiting >= self.max_waiting:
            raise OverloadedError(
                f"the engine's waiting queue is full ({self.max_waiting} requests); retry later"
            )
        self.queues.setdefault(seq.adapter_id, deque()).append(seq)
        self._num_waiting += 1

    def _requeue_front(self, seq: Sequence) -> None:
        # Preempted work goes back to the head of its own queue; it does not count against the
        # bound (it was already accepted) so a full queue can never drop it.
        self.queues.setdefault(seq.adapter_id, deque()).appendleft(seq)
        self.queues.move_to_end(seq.adapter_id, last=False)
        self._num_waiting += 1

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is and free what it holds (finish or abort)."""
        if seq.status is SeqStatus.WAITING:
            queue = self.queues.get(seq.adapter_id)
            if queue is not None and seq in queue:
                queue.remove(seq)
                self._num_waiting -= 1
                if not queue:
                    del self.queues[seq.adapter_id]
        elif seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        if seq.adapter_slot >= 0 and seq.adapter_id is not None:
            self.adapters.release(seq.adapter_id, seq.adapter_slot)
        seq.adapter_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self._requeue_front(seq)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this loop to make room
                continue
            n = min(seq.remaining, budget)
            while not self.blocks.ensure(seq.request_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chosen.append(ScheduledSeq(seq, n))
                budget -= n

        if not preempted:
            budget = self._admit(budget, chosen)

        prefills = [s for s in chosen if not (s.num_tokens == 1 and s.seq.num_computed > 0)]
        decodes = [s for s in chosen if s.num_tokens == 1 and s.seq.num_computed > 0]
        return ScheduledBatch(prefills=prefills, decodes=decodes, preempted=preempted)

    def _admit(self, budget: int, chosen: list[ScheduledSeq]) -> int:
        """Admit waiting sequences, one per adapter queue per round, while budget, seats and blocks last.

        Queues are kept in least-recently-served order: a queue that just admitted one moves to the
        back, so every adapter gets a turn before any gets a second one, across steps too.
        """
        blocked: set[str | None] = set()  # queues whose adapter is not resident yet
        progress = True
        while progress:
            progress = False
            for key in list(self.queues):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    return budget
                if key in blocked:
                    continue
                queue = self.queues[key]
                seq = queue[0]
                n = min(seq.remaining, budget)
                if self.blocks.extra_blocks_needed(seq.request_id, n) > self.blocks.num_free:
                    return budget  # out of KV: admit nothing more this step
                slot = -1
                if seq.adapter_id is not None:
                    got = self.adapters.acquire(seq.adapter_id)
                    if got is None:  # adapter not on the device yet: other adapters go on
                        blocked.add(key)
                        continue
                    slot = got
                self.blocks.ensure(seq.request_id, n)
                queue.popleft()
                self._num_waiting -= 1
                if queue:
                    self.queues.move_to_end(key)
                else:
                    del self.queues[key]
                seq.adapter_slot = slot
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                chosen.append(ScheduledSeq(seq, n))
                budget -= n
                progress = True
        return budget

    def has_work(self) -> bool:
        return bool(self.running) or self._num_waiting > 0
