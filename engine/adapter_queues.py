"""Adapter-tagged waiting queues: one FIFO per adapter id (None = the base model), and their bounds.

The scheduler (engine/scheduler.py) admits from these queues; this is what it builds on: where a
request waits, in which order queues are served (least recently served first), and whether an
arrival is accepted at all.

Submit-side bounds (either policy; refusals raise OverloadedError at once, nothing is queued):
an adapter holding `max_waiting_per_adapter` waiting requests is refused. Beyond `max_waiting`
waiting in all, an arrival is refused if its adapter already holds its weighted share of
`max_waiting` (max_waiting x weight / the weights of the adapters waiting, itself included);
adapters under their share are still accepted up to `waiting_slack` more, so a flood, from one
adapter or from many, is refused to the floods only. Preempted work goes back to the head of its
own queue and is never refused (it was accepted once).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from engine.errors import OverloadedError
from engine.fair_share import FairShare
from engine.sequence import Sequence

RETRY_AFTER_RANGE_S = (1.0, 60.0)  # the OverloadedError hint, clamped: HTTP Retry-After is whole seconds


def _tenant(adapter_id: str | None) -> str:
    return "the base model" if adapter_id is None else f"adapter {adapter_id!r}"


class AdapterQueues:
    def __init__(
        self,
        fair: FairShare,
        max_waiting: int,
        max_waiting_per_adapter: int | None,
        waiting_slack: int,
        clock: Callable[[], float],
    ) -> None:
        self.fair = fair
        self.max_waiting = max_waiting
        self.max_waiting_per_adapter = max_waiting_per_adapter
        self.waiting_slack = waiting_slack
        self.queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()
        self._num_waiting = 0
        self._clock = clock

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
            self._refuse(key, f"the waiting queue is full ({self._num_waiting} requests)", scope="replica")
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

    def _refuse(self, key: str | None, reason: str, scope: str = "adapter") -> None:
        self.fair.record_rejection(key)
        raise OverloadedError(f"{reason}; retry later", retry_after_s=self.retry_after_s(key), adapter_id=key,
                              scope=scope)

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

    def _discard_waiting(self, seq: Sequence) -> None:
        """Take a waiting `seq` out of its queue (finished or aborted before it ran); nothing if it is not there."""
        queue = self.queues.get(seq.adapter_id)
        if queue is not None and seq in queue:
            queue.remove(seq)
            self._num_waiting -= 1
            if not queue:
                self._drop_queue(seq.adapter_id)

    def _drop_queue(self, key: str | None) -> None:
        del self.queues[key]
        self.fair.left_backlog(key, backlog_empty=not self.queues)
