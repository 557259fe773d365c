"""Background adapter loads with a deadline: a hung read (a stalled Hub download) never starves the rest.

A load runs on its own thread; at most `max_concurrent` live loads run at once and the others
queue. Each load has a deadline (`timeout_s` from when it was asked for). `expire()`, called by
the pool's owner every step, gives up on the loads past it: their waiting requests fail, and a
given-up load stops counting against `max_concurrent`, so the next queued load starts. Its
thread cannot be killed; it runs on and its result is dropped (`LoadJob.abandoned`). At most
`max_abandoned` such threads may linger; beyond that new loads wait in the queue (and time out
there) rather than pile up threads.

The runner shares its owner's lock: whether a job was given up on and whether its result is used
are decided under the same lock, so exactly one of the two happens.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class LoadJob:
    adapter_id: str
    deadline: float  # time.monotonic()
    abandoned: bool = False  # given up on: whatever the load returns later is dropped


class LoadRunner:
    def __init__(
        self,
        work: Callable[[LoadJob], None],
        lock: threading.RLock,
        timeout_s: float,
        max_concurrent: int = 2,
        max_abandoned: int = 8,
        executor: Executor | None = None,
    ) -> None:
        self._work = work
        self._lock = lock
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        self.max_abandoned = max_abandoned
        self._executor = executor  # tests inject one that runs jobs when told; it runs every job it gets
        self._queued: deque[LoadJob] = deque()
        self._running: dict[str, LoadJob] = {}
        self._lingering = 0  # abandoned jobs whose threads still run
        self._stopped = False

    def pending(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._running or any(j.adapter_id == adapter_id for j in self._queued)

    def count(self) -> int:
        with self._lock:
            return len(self._running) + len(self._queued)

    def submit(self, adapter_id: str) -> None:
        """Queue a load of `adapter_id` (the caller keeps it single flight with `pending`)."""
        with self._lock:
            self._queued.append(LoadJob(adapter_id, time.monotonic() + self.timeout_s))
            self._pump()

    def expire(self) -> list[LoadJob]:
        """Give up on the queued or running loads past their deadline; the caller fails their requests."""
        now = time.monotonic()
        with self._lock:
            late = [j for j in self._queued if j.deadline <= now]
            late += [j for j in self._running.values() if j.deadline <= now]
            for job in late:
                job.abandoned = True
                if self._running.get(job.adapter_id) is job:
                    del self._running[job.adapter_id]
                    self._lingering += 1
            self._queued = deque(j for j in self._queued if not j.abandoned)
            self._pump()
            return late

    def run_now(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a synchronous read: start-up, admin load/reload) bounded by the same timeout.

        Raises TimeoutError past it; the thread is then left to finish and counts as lingering.
        """
        with self._lock:
            if self._lingering >= self.max_abandoned:
                raise TimeoutError(f"not loaded: {self._lingering} earlier adapter loads timed out and are still "
                                   f"running; retry later")
        result: list[T] = []
        error: list[BaseException] = []
        finished = threading.Event()
        gave_up = threading.Event()

        def target() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # handed to the caller's thread
                error.append(exc)
            finally:
                with self._lock:
                    finished.set()
                    if gave_up.is_set():
                        self._lingering -= 1
                        self._pump()

        threading.Thread(target=target, name="adapter-load-sync", daemon=True).start()
        finished.wait(self.timeout_s)
        with self._lock:
            if not finished.is_set():
                gave_up.set()
                self._lingering += 1
                raise TimeoutError(f"load timed out after {self.timeout_s:g} s (adapter_load_timeout_s)")
        if error:
            raise error[0]
        return result[0]

    def _pump(self) -> None:
        # Under the lock. Start queued loads while there is room.
        while self._queued and not self._stopped:
            if self._executor is None and (len(self._running) >= self.max_concurrent
                                           or self._lingering >= self.max_abandoned):
                return
            job = self._queued.popleft()
            self._running[job.adapter_id] = job
            if self._executor is not None:
                self._executor.submit(self._run, job)
            else:
                threading.Thread(target=self._run, args=(job,), name="adapter-load", daemon=True).start()

    def _run(self, job: LoadJob) -> None:
        try:
            self._work(job)
        finally:
            with self._lock:
                if job.abandoned:
                    self._lingering -= 1
                elif self._running.get(job.adapter_id) is job:
                    del self._running[job.adapter_id]
                self._pump()

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._queued.clear()
