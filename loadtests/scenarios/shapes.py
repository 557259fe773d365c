"""Load shapes: the burst profile (idle -> step to many users -> idle), shared with the runner.

The runner labels each request before/during/after with `burst_phases`, so the shape and the
report agree on where the burst starts and ends.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

from loadtests.scenarios.phases import burst_phases


class BurstShape(LoadTestShape):
    """LOADTEST_IDLE_USERS users, then LOADTEST_USERS for the burst window, then idle again."""

    def tick(self) -> tuple[int, float] | None:
        duration = float(os.environ.get("LOADTEST_DURATION", "60"))
        idle = int(os.environ.get("LOADTEST_IDLE_USERS", "1"))
        peak = int(os.environ.get("LOADTEST_USERS", "16"))
        t = self.get_run_time()
        if t >= duration:
            return None
        for name, start, end in burst_phases(duration):
            if start <= t < end:
                # The step is immediate: spawn the whole burst within a second.
                return (peak, float(peak)) if name == "during" else (idle, float(peak))
        return None


class ConstantShape(LoadTestShape):
    """LOADTEST_USERS users for LOADTEST_DURATION seconds."""

    def tick(self) -> tuple[int, float] | None:
        duration = float(os.environ.get("LOADTEST_DURATION", "60"))
        users = int(os.environ.get("LOADTEST_USERS", "8"))
        return (users, float(users)) if self.get_run_time() < duration else None
