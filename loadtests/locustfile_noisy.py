"""Noisy neighbours: two adapters flood while two others send light traffic (loadtests/scenarios/noisy.py).

Users per role: B and C, LOADTEST_LIGHT_USERS each (default 4: enough that slower answers beside
the floods do not lower their rate), together LOADTEST_LIGHT_RPS requests per second per role
(default 2.5, about a tenth of what one demo replica serves), every request streamed (TTFT from
the stream); they run alone for the first 30% of the run. Then A1 and A2 join (their users exist
from the start and wait for that moment: exact user counts all along), LOADTEST_USERS each
(default 48), each user starting LOADTEST_FLOOD_USER_RPS requests per second (default 1). Every
user's requests start as a Poisson process (`NoisyUser.wait_time`), as the in-process benchmark's
arrivals. The floods keep more requests in flight than the adapter's seats plus its waiting bound,
so part of every flood is refused (429) at arrival; half of theirs streamed. A flood user that
gets a 429 does not wait for Retry-After: it keeps sending at its rate, as a misbehaving client
would. The runner starts B's and C's users and the floods' in separate locust processes.

    python -m loadtests.run_loadtest --scenario noisy --duration 120 --model demo --out loadtests/results/noisy
    python -m loadtests.run_loadtest --scenario noisy --duration 120 --model demo --haproxy --out loadtests/results/noisy_haproxy
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import Any

import gevent
from locust import LoadTestShape, events, task
from locust.env import Environment

from loadtests.scenarios.common import LoraUser, env_float, test_start_time
from loadtests.scenarios.noisy import ROLES, Role, noisy_phases

__all__ = ["FloodA1", "FloodA2", "LightB", "LightC", "NoisyShape"]

LIGHT_USERS = int(env_float("LOADTEST_LIGHT_USERS", 4))
FLOOD_USERS = int(env_float("LOADTEST_USERS", 48))
LIGHT_RPS = env_float("LOADTEST_LIGHT_RPS", 2.5)
FLOOD_USER_RPS = env_float("LOADTEST_FLOOD_USER_RPS", 1.0)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "hex", "bad", "jugglers"]
ROLE = {r.name: r for r in ROLES}
_started: list[float] = []  # when the test started (the runner's phases count from the same moment)
_user_ids = itertools.count(1)


def duration_s() -> float:
    return float(os.environ.get("LOADTEST_DURATION", "120"))


@events.test_start.add_listener
def _mark_start(environment: Environment, **_: Any) -> None:
    _started[:] = [test_start_time()]


def text_of(chars: int, salt: int) -> str:
    """About `chars` characters of words (the demo tokenizer: about a token each), varied by `salt`."""
    out: list[str] = []
    i = salt
    while sum(len(w) + 1 for w in out) < chars:
        out.append(WORDS[i % len(WORDS)])
        i = (i * 7 + 3) % 1009
    return " ".join(out)[:chars]


class NoisyUser(LoraUser):
    abstract = True
    role: Role
    rate: float  # requests this user starts per second, on average (see wait_time)

    def on_start(self) -> None:
        self._n = 0
        self._uid = next(_user_ids)
        self._rng = random.Random(self._uid)
        self._next_start = time.monotonic()

    def wait_time(self) -> float:
        """Until this user's next request: its starts are a Poisson process of `rate` (exponential gaps),
        as the arrivals of loadtests/bench_fairness.py; together the users send a Poisson stream.
        locust's constant_throughput keeps every user on the grid of their common start instead, and
        a refused request comes back within milliseconds: the refused part of a flood (most of it)
        arrived at the same instant every 1/rate s, in bursts no independent clients would send. A
        user whose request took longer than its gap starts the next at once; it never catches up more
        than one mean gap (a late schedule restarts from now)."""
        now = time.monotonic()
        self._next_start = max(self._next_start, now - 1.0 / self.rate) + self._rng.expovariate(self.rate)
        return max(0.0, self._next_start - now)

    def pick_adapter(self) -> str:
        return self.role.adapter

    def pick_prompt(self) -> str:
        """A prompt no other request sends: every user walks the same 1,009 texts, and a repeated prompt
        is served from the prefix cache, so a flood of "long prompts" would cost no prefill at all
        (and, since cached tokens are not charged, too little service to stay backlogged)."""
        self._n += 1
        tag = f"{self._uid}.{self._n} "
        return tag + text_of(self.role.prompt_chars - len(tag), self._n)

    def pick_max_new_tokens(self) -> int:
        return self.role.max_new_tokens

    def stream_fraction(self) -> float:
        return 0.5 if self.role.flood else 1.0

    @task
    def generate(self) -> None:
        if self.role.flood and self._n == 0:  # every user runs from the start; the floods begin at the
            (_, _, split), _ = noisy_phases(duration_s())  # second phase, spread over their first gap
            wait = (_started[0] if _started else time.time()) + split - time.time()
            wait += self._rng.expovariate(self.rate)
            if wait > 0:
                gevent.sleep(wait)
                self._next_start = time.monotonic()
        self.one_request()


class LightB(NoisyUser):
    role = ROLE["B"]
    fixed_count = LIGHT_USERS
    rate = LIGHT_RPS / LIGHT_USERS


class LightC(NoisyUser):
    role = ROLE["C"]
    fixed_count = LIGHT_USERS
    rate = LIGHT_RPS / LIGHT_USERS


class FloodA1(NoisyUser):
    role = ROLE["A1"]
    fixed_count = FLOOD_USERS
    rate = FLOOD_USER_RPS


class FloodA2(NoisyUser):
    role = ROLE["A2"]
    fixed_count = FLOOD_USERS
    rate = FLOOD_USER_RPS


NOISY_CLASSES = (LightB, LightC, FloodA1, FloodA2)


class NoisyShape(LoadTestShape):
    """Every user from the start, for the whole run (the flood users wait for their phase: NoisyUser).
    Users of the classes this process runs: the runner gives the light and the flooding tenants a
    locust process each (`locust ... LightB LightC`), as separate clients would be."""

    def tick(self) -> tuple[int, float] | None:
        classes = self.runner.user_classes if self.runner is not None else NOISY_CLASSES
        total = sum(int(getattr(c, "fixed_count", 0)) for c in classes)
        return (total, float(total)) if self.get_run_time() < duration_s() else None
