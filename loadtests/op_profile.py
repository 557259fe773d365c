"""Where a benchmark case's time goes: self time per torch op over the whole case, cases side by side.

`bench_engine --profile` runs each engine case under torch.profiler and prints one table: for every op
(oneDNN linears, the native attention and LoRA ops, the small torch ops in between) its self time
in each case, and what is left of the wall time outside torch ops (Python: batch preparation,
scheduling, sampling bookkeeping, and the step thread waiting for work). Cases of one workload
generate the same tokens, so their columns compare directly. The profiler adds a few microseconds
per op: compare columns of one run, not a profiled run's tokens/s with an unprofiled one's.

The engine steps on its own thread, started before any case, so the profiler must record every
thread (`profile_all_threads`, torch >= 2.8); the default records only the thread that starts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")
OUTSIDE_OPS = "(outside torch ops: Python, waits)"


@dataclass(frozen=True)
class OpProfile:
    """One case: wall time, and per op name its self CPU seconds and number of calls."""

    wall_s: float
    self_s: dict[str, float]
    calls: dict[str, int]

    def plus(self, other: OpProfile) -> OpProfile:
        """Both runs' times added (rounds of one case)."""
        keys = self.self_s.keys() | other.self_s.keys()
        return OpProfile(self.wall_s + other.wall_s,
                         {k: self.self_s.get(k, 0.0) + other.self_s.get(k, 0.0) for k in keys},
                         {k: self.calls.get(k, 0) + other.calls.get(k, 0) for k in keys})

    @property
    def outside_ops_s(self) -> float:
        return max(0.0, self.wall_s - sum(self.self_s.values()))


def _all_threads_config() -> object:
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError as exc:  # older torch: the step thread would be invisible, the table meaningless
        raise SystemExit(f"--profile needs a torch whose profiler records all threads ({torch.__version__}): {exc}") from exc


def profiled(fn: Callable[[], T]) -> tuple[T, OpProfile]:
    """fn()'s result and the self time of every op any thread ran while it did."""
    with profile(activities=[ProfilerActivity.CPU], experimental_config=_all_threads_config()) as prof:
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
    self_s: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.key_averages():
        self_s[event.key] = self_s.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
        calls[event.key] = calls.get(event.key, 0) + event.count
    return result, OpProfile(wall, self_s, calls)


def side_by_side(cases: dict[str, OpProfile], top: int = 25) -> str:
    """A markdown table: the `top` ops by their largest self time in any case, the rest summed, then
    time outside ops and wall time; seconds and share of the case's wall time, and the last case's
    seconds over the first's (how much more the op costs in, say, the mixed case than in base only)."""
    names = list(cases)
    first, last = cases[names[0]], cases[names[-1]]
    ops = sorted({op for c in cases.values() for op in c.self_s}, key=lambda op: -max(c.self_s.get(op, 0.0)
                                                                                        for c in cases.values()))
    shown, rest = ops[:top], ops[top:]
    ratio_head = f" {names[-1]} / {names[0]} |" if len(names) > 1 else ""
    lines = ["| op | " + " | ".join(f"{n}: s (share, calls)" for n in names) + " |" + ratio_head,
             "| --- |" + " ---: |" * len(names) + (" ---: |" if ratio_head else "")]

    def row(label: str, seconds: Callable[[OpProfile], float], calls: Callable[[OpProfile], int | None]) -> str:
        cells = []
        for c in cases.values():
            n = calls(c)
            cells.append(f"{seconds(c):.2f} ({seconds(c) / c.wall_s:.1%}{'' if n is None else f', {n}'})")
        ratio = ""
        if ratio_head:
            ratio = f" {seconds(last) / seconds(first):.2f}x |" if seconds(first) > 0 else " — |"
        return f"| {label} | " + " | ".join(cells) + " |" + ratio

    for op in shown:
        lines.append(row(op, lambda c, op=op: c.self_s.get(op, 0.0), lambda c, op=op: c.calls.get(op, 0)))
    if rest:
        lines.append(row(f"({len(rest)} other ops)", lambda c: sum(c.self_s.get(op, 0.0) for op in rest),
                         lambda c: sum(c.calls.get(op, 0) for op in rest)))
    lines.append(row(OUTSIDE_OPS, lambda c: c.outside_ops_s, lambda c: None))
    lines.append(row("wall time", lambda c: c.wall_s, lambda c: None))
    return "\n".join(lines)
