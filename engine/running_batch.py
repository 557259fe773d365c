"""The running sequences and what they hold: KV blocks, prefix-cache hits and pinned adapter slots.

The scheduler (engine/scheduler.py) builds on this: a waiting head starts running (`_start`), a
running sequence is preempted back to the head of its queue or removed when it finishes, and each
move takes or gives back exactly its blocks and its adapter slot.

Prefix caching (engine/block_manager.py): a waiting head is admitted from the longest run of
cached blocks computed by its own weights (`_lookup`: the base model's identity, or its adapter's id
and weights digest), so its chunk, its block needs and its fair-share charge count only the tokens
still to compute. The identity is checked again on the slot acquire() pins: an adapter reloaded in
between has the head wait a step and look again, never start from another's K/V. At the start of
each step the blocks the last one completed are registered, and a sequence's are when it leaves.

`long_prefill_token_threshold` (vLLM's name; 0 = off): no sequence runs more than this many tokens
in one step, so a long prompt is spread over more, shorter steps (`_chunk`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from engine.adapter_queues import AdapterQueues
from engine.block_manager import BlockManager
from engine.fair_share import FairShare
from engine.prefix_cache import BASE_IDENTITY, NO_HIT, PrefixHit
from engine.scheduled_batch import ScheduledSeq
from engine.sequence import SeqStatus, Sequence


class AdapterResidency(Protocol):
    """Where adapters live on the device; the scheduler only pins and unpins."""

    def acquire(self, adapter_id: str) -> int | None:
        """Pin `adapter_id` in a device slot and return it; None if it is not resident yet."""

    def release(self, adapter_id: str, slot: int) -> None: ...

    def cache_identity(self, adapter_id: str, slot: int | None = None) -> str | None:
        """The prefix-cache identity of the weights in `slot` (None: those acquire() would pin now)."""


class RunningBatch(AdapterQueues):
    """The adapter queues (AdapterQueues) and the sequences running from them, with their limits."""

    def __init__(
        self,
        *,
        blocks: BlockManager,
        adapters: AdapterResidency,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int,
        fair: FairShare,
        max_waiting: int,
        max_waiting_per_adapter: int | None,
        waiting_slack: int,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(fair, max_waiting, max_waiting_per_adapter, waiting_slack, clock)
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.running: list[Sequence] = []
        self._running_of: dict[str | None, int] = {}

    def running_of(self, adapter_id: str | None) -> int:
        return self._running_of.get(adapter_id, 0)

    def remove(self, seq: Sequence, *, cache_blocks: bool = True) -> None:
        """Take a sequence out wherever it is and free what it holds (finish or abort).

        cache_blocks=False (a failed request): its computed blocks not yet in the prefix cache stay out.
        """
        if seq.status is SeqStatus.WAITING:
            self._discard_waiting(seq)
        elif seq.status is SeqStatus.RUNNING and seq in self.running:
            self._stop_running(seq)
        self._release(seq, cache_blocks=cache_blocks)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

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

    def _release(self, seq: Sequence, *, cache_blocks: bool = True) -> None:
        if cache_blocks:  # what it computed stays reusable, by a later request or by itself after preemption
            self.blocks.cache_computed(seq)
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

    def _chunk(self, seq: Sequence, budget: int, hit: PrefixHit = NO_HIT) -> int:
        """Tokens `seq` runs this step: what it has left (past a prefix hit), within the budget and
        long_prefill_token_threshold."""
        n = min(seq.remaining - hit.num_tokens, budget)
        cap = self.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _lookup(self, seq: Sequence) -> PrefixHit:
        """The cached prefix a waiting head would start from (engine/prefix_cache.py); NO_HIT with caching off.

        A request for prompt logprobs reads nothing (they come from computing every prompt position)
        but registers what it computes. An adapter not loaded yet has no identity: _start finds it not
        resident and starts its load.
        """
        if not self.blocks.caching:
            return NO_HIT
        identity = BASE_IDENTITY if seq.adapter_id is None else self.adapters.cache_identity(seq.adapter_id)
        if identity is None:
            return NO_HIT
        return self.blocks.lookup(seq, identity, read=not seq.params.prompt_logprobs)

    @staticmethod
    def _unchoose(chosen: list[ScheduledSeq], seq: Sequence) -> int:
        """Drop `seq` from this step's batch if it was already in it; the tokens it had go back to the budget."""
        for i, item in enumerate(chosen):
            if item.seq is seq:
                del chosen[i]
                return item.num_tokens
        return 0

    def _blocks_freed_by_preempting(self, seq: Sequence, hit: PrefixHit = NO_HIT) -> int:
        """Blocks that preempting running `seq` would free for a head starting from `hit`: those no other
        running sequence holds (a hit block it holds is the head's either way)."""
        table = self.blocks.table(seq.request_id)
        if not self.blocks.caching:  # no block is shared
            return len(table)
        others = {block for s in self.running if s is not seq for block in self.blocks.table(s.request_id)}
        return sum(1 for block in table if block not in others and block not in hit.blocks)

    def _start(
        self, key: str | None, num_tokens: int, chosen: list[ScheduledSeq], now: float, hit: PrefixHit = NO_HIT,
        give_way: Sequence | None = None,
    ) -> bool:
        """Move the head of `key`'s queue to running from its prefix `hit` with `num_tokens` more this step;
        False if its adapter is not resident. `give_way`, a running sequence of another adapter, is
        preempted to make room once the head is pinned, never for a head that then does not start."""
        seq = self.queues[key][0]
        slot = -1
        if seq.adapter_id is not None:
            got = self.adapters.acquire(seq.adapter_id)
            if got is None:
                return False
            if self.blocks.caching and self.adapters.cache_identity(seq.adapter_id, got) != hit.identity:
                # (Re)loaded since the lookup: the hit was computed by other weights. Look again next step.
                self.adapters.release(seq.adapter_id, got)
                return False
            slot = got
        if give_way is not None:
            self._preempt(give_way)
        self.blocks.admit(seq, hit)
        seq.num_computed = hit.num_tokens
        seq.num_charged = max(seq.num_charged, hit.num_tokens)  # cached tokens cost no computation: not charged
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
