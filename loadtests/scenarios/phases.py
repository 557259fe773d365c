"""The burst profile's timing, without importing locust (which gevent-patches the importing process):
the runner and the tests label requests before/during/after with it, the locust shape follows it."""

from __future__ import annotations

BURST_START = 0.3  # fraction of the run spent idle before the burst
BURST_END = 0.65  # fraction of the run at which the burst stops


def burst_phases(duration_s: float) -> list[tuple[str, float, float]]:
    """(name, start s, end s) of the burst scenario's phases."""
    a, b = duration_s * BURST_START, duration_s * BURST_END
    return [("before", 0.0, a), ("during", a, b), ("after", b, duration_s)]
