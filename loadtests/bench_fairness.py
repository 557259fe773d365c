"""Fairness under overload: the same traffic under round-robin and token-fair (VTC) scheduling, one process.

    python -m loadtests.bench_fairness            # about 4 minutes: calibration, B+C alone, round_robin, fair x 2
    python -m loadtests.bench_fairness --quick    # about 1 minute, for a smoke run

In-process engine on the demo model (models/demo.py), four adapters in four roles:

- A1 (weight 1): long prompts, short outputs; A2 (weight 2): short prompts, long outputs. Each is
  offered 10x the engine's capacity, so both are backlogged all the time.
- B and C (weight 1): each offered about 10% of capacity.

Capacity is measured first (A1 and A2 saturating the engine) in weighted tokens per second, the
unit the fair scheduler counts: prompt tokens + 2 x generated tokens (EngineConfig's
prefill_token_cost / decode_token_cost). Arrivals are Poisson with a fixed seed, so every policy
sees the same schedule. "Alone" runs B and C's traffic without A1 and A2. "fair_mixed_steps" is the
fair policy with under_share_prefill_first off (B's and C's prompts then share a step with the
floods' decodes and chunks), to show what that rule buys. Per policy the window is
[warm-up, end of arrivals]; service per adapter comes from Engine.stats().fairness (exactly what
was scheduled), TTFT and rejection latency from the clients, over the requests that arrived in the
window (from the scheduled arrival time, so any lag of this process's event loop counts against the
engine; the time inside Engine.generate() until OverloadedError is shown too). Every model step is
timed (StepLog), so B's and C's time to first token is split into its parts: the wait for the step
that ran their prompt (the step under way at arrival, and any more before theirs), that step, and the
delivery to the client. Writes summary.md, summary.json and fairness.png to --out and prints the table.

Engine settings (ENGINE_OPTIONS, the same for every phase), chosen as a latency-conscious operator
would: a request that arrives waits out the step under way, so the token budget bounds the longest
wait (Sarathi-Serve's rule: size the budget by the latency target, not the throughput). With
max_num_batched_tokens=128 a step carrying a flood's prompt chunk costs about 1.5x one of 32
decodes only (with 256, about 2x in a run before) at the same throughput; max_num_seqs=32 as before
(64 seats made every decode step longer for no throughput). Prefill-first for adapters under their
share is on (the default; "fair_mixed_steps" turns it off). loadtests/results/fairness/latency.md
has the measurements behind these choices.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine import Engine, EngineConfig, OverloadedError, QueueTimeoutError, SamplingParams
from models.resolve import resolve_model

ROLES = ("A1", "A2", "B", "C")
ADAPTER_OF = {"A1": "qv-r4", "A2": "attn-r8", "B": "mlp-r16", "C": "o-r2"}  # demo adapters
WEIGHTS = {"A1": 1.0, "A2": 2.0, "B": 1.0, "C": 1.0}
SHAPES = {"A1": (384, 16), "A2": (16, 160), "B": (48, 24), "C": (24, 48)}  # (prompt, output) tokens
FLOODS, LIGHTS = ("A1", "A2"), ("B", "C")
FLOOD_FACTOR, LIGHT_FRACTION = 10.0, 0.10
PREFILL_COST, DECODE_COST = 1.0, 2.0
BUCKET_S = 1.0
ARRIVAL_TICK_S = 0.005
CALIBRATION_LIGHT_RATE = 1.0  # requests/s of B and C while capacity is measured
ENGINE_OPTIONS: dict[str, Any] = dict(
    max_num_seqs=32, max_num_batched_tokens=128, num_kv_blocks=1024, max_waiting=256, max_waiting_per_adapter=64,
    prefill_token_cost=PREFILL_COST, decode_token_cost=DECODE_COST, under_share_prefill_first=True,
)
PHASES = ("calibration", "alone", "round_robin", "fair", "fair_mixed_steps")
BARS = dict(light_ttft_ratio=2.0, flood_share=0.70, rejection_p99_s=0.100, jain=0.95, weight_ratio_tol=0.10)


def request_cost(role: str) -> float:
    prompt, output = SHAPES[role]
    return prompt * PREFILL_COST + output * DECODE_COST


@dataclass
class Record:
    role: str
    arrival: float  # seconds from phase start
    request_id: str
    submitted: float | None = None  # seconds from phase start when Engine.generate was called
    outcome: str = "pending"  # ok / rejected / queue_timeout / error / cancelled
    ttft_s: float | None = None
    rejection_s: float | None = None  # scheduled arrival -> OverloadedError raised
    rejection_call_s: float | None = None  # Engine.generate called -> OverloadedError raised


@dataclass
class Phase:
    name: str
    records: list[Record] = field(default_factory=list)
    service: dict[str, float] = field(default_factory=dict)  # weighted tokens in the window, per role
    generated: dict[str, int] = field(default_factory=dict)  # generated tokens in the window, per role
    window_s: float = 0.0
    steps: int = 0  # engine steps in the window
    timeline: dict[str, list[float]] = field(default_factory=dict)  # weighted tokens per BUCKET_S
    start: float = 0.0  # perf_counter() at the phase start: arrivals are seconds from here
    step_log: StepLog | None = None


@dataclass(frozen=True)
class StepRecord:
    start: float  # perf_counter() around the model step (ModelRunner.run)
    end: float
    prefill_seqs: int
    prefill_tokens: int
    decodes: int
    first_tokens: tuple[str, ...]  # request ids whose first token this step samples

    @property
    def kind(self) -> str:
        return "decode-only" if not self.prefill_seqs else "prefill-only" if not self.decodes else "mixed"


class StepLog:
    """Times each model step of an engine, with what was in it. Measurement only: it wraps the
    engine's ModelRunner.run and changes nothing in what runs."""

    def __init__(self, engine: Engine) -> None:
        self.records: list[StepRecord] = []
        run = engine.runner.run

        def timed(batch: Any) -> Any:
            firsts = tuple(s.seq.request_id for s in batch.prefills if s.samples and not s.seq.output_ids)
            started = time.perf_counter()
            try:
                return run(batch)
            finally:  # appended by the engine's step thread only; read once the phase is over
                self.records.append(StepRecord(started, time.perf_counter(), len(batch.prefills),
                                               sum(s.num_tokens for s in batch.prefills), len(batch.decodes), firsts))

        engine.runner.run = timed  # type: ignore[method-assign]


def make_engine(model: Any, policy: str, prefill_first: bool = True) -> Engine:
    weights = {ADAPTER_OF[r]: w for r, w in WEIGHTS.items()}
    options = {**ENGINE_OPTIONS, "under_share_prefill_first": prefill_first}
    engine = Engine(EngineConfig(model=model.path, adapters=model.adapters, scheduling_policy=policy,
                                 adapter_weights=weights, **options))
    if engine.scheduler.under_share_prefill_first is not prefill_first:  # a phase measures what its name says
        engine.shutdown()
        raise RuntimeError("the engine did not pass under_share_prefill_first to its scheduler")
    return engine


def poisson_schedule(rates: dict[str, float], duration: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    for role, rate in rates.items():
        t = rng.expovariate(rate)
        while t < duration:
            out.append((t, role))
            t += rng.expovariate(rate)
    return sorted(out)


def fairness_totals(engine: Engine) -> tuple[dict[str, float], dict[str, int], int]:
    stats = engine.stats()
    accounts = stats.fairness
    service, generated = {}, {}
    for role in ROLES:
        a = accounts.get(ADAPTER_OF[role], {"prefill_tokens": 0, "decode_tokens": 0})
        service[role] = a["prefill_tokens"] * PREFILL_COST + a["decode_tokens"] * DECODE_COST
        generated[role] = a["decode_tokens"]
    return service, generated, stats.steps


async def run_phase(
    engine: Engine, name: str, schedule: list[tuple[float, str]], duration: float, warmup: float, vocab: int,
) -> Phase:
    phase = Phase(name, timeline={r: [0.0] * (int(duration / BUCKET_S) + 1) for r in ROLES})
    phase.step_log = StepLog(engine)
    rng = random.Random(7)
    prompts = {r: [[rng.randrange(8, vocab) for _ in range(SHAPES[r][0])] for _ in range(16)] for r in ROLES}
    start = phase.start = time.perf_counter()
    bar = tqdm(total=int(duration), desc=name, unit="s", leave=False)

    def bucket(t: float) -> int:
        return min(int(t / BUCKET_S), len(phase.timeline["A1"]) - 1)

    async def one(rec: Record, i: int) -> None:
        prompt = prompts[rec.role][i % 16]
        params = SamplingParams(max_new_tokens=SHAPES[rec.role][1], ignore_eos=True)
        called = time.perf_counter()
        rec.submitted = called - start
        try:
            async for out in engine.generate(prompt, params, ADAPTER_OF[rec.role], request_id=rec.request_id):
                now = time.perf_counter() - start
                if rec.ttft_s is None:
                    rec.ttft_s = now - rec.arrival
                    phase.timeline[rec.role][bucket(now)] += len(prompt) * PREFILL_COST
                phase.timeline[rec.role][bucket(now)] += len(out.tokens) * DECODE_COST
            rec.outcome = "ok"
        except OverloadedError:
            now = time.perf_counter()
            rec.rejection_s, rec.rejection_call_s = now - start - rec.arrival, now - called
            rec.outcome = "rejected"
        except QueueTimeoutError:
            rec.outcome = "queue_timeout"
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        except Exception:  # counted, never hidden: a failed request shows up in the table
            rec.outcome = "error"

    tasks: list[tuple[Record, asyncio.Task[None]]] = []
    loop = asyncio.get_running_loop()
    loop_start = loop.time() - (time.perf_counter() - start)

    def launch(rec: Record, i: int) -> None:
        phase.records.append(rec)
        tasks.append((rec, asyncio.ensure_future(one(rec, i))))

    # B's and C's arrivals (a few per second) get a timer each, so the tick that batches the floods'
    # hundreds per second never holds them back; a busy event loop still delays them, and counts.
    for i, (t, role) in enumerate(schedule):
        if role in LIGHTS:
            loop.call_at(loop_start + t, launch, Record(role, t, f"{name}-{i}"), i)
    before: tuple[dict[str, float], dict[str, int], int] | None = None
    window_start = warmup
    for i, (t, role) in enumerate(schedule):
        if role in LIGHTS:
            continue
        delay = t - (time.perf_counter() - start)
        if delay > 0:  # arrivals due within one tick go together: one event-loop wake-up, not hundreds
            await asyncio.sleep(max(delay, ARRIVAL_TICK_S))
        elapsed = time.perf_counter() - start
        if before is None and elapsed >= warmup:
            before = fairness_totals(engine)
            window_start = elapsed
        if int(elapsed) > bar.n:
            bar.update(int(elapsed) - bar.n)
        launch(Record(role, t, f"{name}-{i}"), i)
    if before is None:  # fewer flood arrivals than the warm-up lasts (or none)
        await asyncio.sleep(max(0.0, warmup - (time.perf_counter() - start)))
        before, window_start = fairness_totals(engine), time.perf_counter() - start
    while (left := duration - (time.perf_counter() - start)) > 0:
        await asyncio.sleep(min(1.0, left))
        bar.update(max(0, int(time.perf_counter() - start) - bar.n))
    after = fairness_totals(engine)
    phase.window_s = time.perf_counter() - start - window_start
    phase.service = {r: after[0][r] - before[0][r] for r in ROLES}
    phase.generated = {r: after[1][r] - before[1][r] for r in ROLES}
    phase.steps = after[2] - before[2]
    bar.close()
    # The light adapters' last requests finish; the floods' backlog is cancelled (aborted in the engine).
    pending = [task for rec, task in tasks if rec.role in LIGHTS and not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=30)
    for _, task in tasks:
        task.cancel()
    await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)
    return phase


async def calibrate(engine: Engine, seconds: float, vocab: int) -> float:
    """Weighted tokens per second the engine serves with A1 and A2 saturating it."""
    rng = random.Random(3)
    stop = asyncio.Event()

    async def client(role: str) -> None:
        while not stop.is_set():
            prompt = [rng.randrange(8, vocab) for _ in range(SHAPES[role][0])]
            params = SamplingParams(max_new_tokens=SHAPES[role][1], ignore_eos=True)
            async for _ in engine.generate(prompt, params, ADAPTER_OF[role]):
                if stop.is_set():
                    break

    clients = [asyncio.create_task(client(r)) for r in FLOODS for _ in range(24)]
    await asyncio.sleep(min(2.0, seconds / 3))
    before, t0 = fairness_totals(engine)[0], time.perf_counter()
    for _ in tqdm(range(int(seconds)), desc="calibration", unit="s", leave=False):
        await asyncio.sleep(1.0)
    after, t1 = fairness_totals(engine)[0], time.perf_counter()
    stop.set()
    for task in clients:  # closing a stream aborts its request
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return sum(after[r] - before[r] for r in FLOODS) / (t1 - t0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _seconds(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN: no request of this kind in the window


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def summarize(phase: Phase, rates: dict[str, float], warmup: float) -> dict[str, Any]:
    """Counts over the whole phase; latency percentiles over the requests that arrived in the window."""
    total = sum(phase.service.values()) or 1.0
    roles: dict[str, Any] = {}
    for role in ROLES:
        recs = [r for r in phase.records if r.role == role]
        if not recs:
            continue
        measured = [r for r in recs if r.arrival >= warmup]
        ttft = [r.ttft_s for r in measured if r.ttft_s is not None]
        rej = [r.rejection_s for r in measured if r.rejection_s is not None]
        roles[role] = {
            "adapter": ADAPTER_OF[role], "weight": WEIGHTS[role], "offered_per_s": rates.get(role, 0.0),
            "arrivals": len(recs), "completed": sum(r.outcome == "ok" for r in recs),
            "rejected": sum(r.outcome == "rejected" for r in recs),
            "queue_timeouts": sum(r.outcome == "queue_timeout" for r in recs),
            "errors": sum(r.outcome == "error" for r in recs),
            "service_share": phase.service[role] / total, "service_per_s": phase.service[role] / phase.window_s,
            "generated_per_s": phase.generated[role] / phase.window_s,
            "ttft_p50_s": pct(ttft, 0.50), "ttft_p95_s": pct(ttft, 0.95),
            "rejection_p50_s": pct(rej, 0.50), "rejection_p99_s": pct(rej, 0.99), "rejection_max_s": max(rej, default=0.0),
            "rejection_call_p99_s": pct([r.rejection_call_s for r in measured if r.rejection_call_s is not None], 0.99),
        }
    out: dict[str, Any] = {"window_s": phase.window_s, "roles": roles,
                           "mean_step_s": phase.window_s / phase.steps if phase.steps else float("nan"),
                           "model_steps": step_summary(phase, warmup),
                           "ttft_parts": {role: ttft_parts(phase, role, warmup) for role in LIGHTS if role in roles}}
    if all(r in roles for r in FLOODS):
        normalised = [phase.service[r] / WEIGHTS[r] for r in FLOODS]
        out["jain_floods"] = jain(normalised)
        out["a2_over_a1_service"] = phase.service["A2"] / max(phase.service["A1"], 1e-9)
        out["flood_share"] = sum(phase.service[r] for r in FLOODS) / total
    return out


def step_summary(phase: Phase, warmup: float) -> dict[str, Any]:
    """Model steps in the window by kind (count, mean and p95 ms), and the mean gap between two steps
    (scheduling, sampled tokens to their streams, the loop's wake-ups)."""
    log = [r for r in (phase.step_log.records if phase.step_log else []) if r.start >= phase.start + warmup]
    out: dict[str, Any] = {}
    for kind in ("decode-only", "prefill-only", "mixed"):
        rows = [r for r in log if r.kind == kind]
        ms = [1000 * (r.end - r.start) for r in rows]
        n = max(len(rows), 1)
        out[kind] = {"steps": len(rows), "mean_ms": sum(ms) / n, "p95_ms": pct(ms, 0.95),
                     "mean_decodes": sum(r.decodes for r in rows) / n,
                     "mean_prefill_tokens": sum(r.prefill_tokens for r in rows) / n}
    gaps = [1000 * (b.start - a.end) for a, b in itertools.pairwise(log)]
    out["gap_mean_ms"] = sum(gaps) / len(gaps) if gaps else float("nan")
    return out


def ttft_parts(phase: Phase, role: str, warmup: float) -> dict[str, Any]:
    """`role`'s time to first token in parts, per request that arrived in the window (they add up):
    this process's lag in submitting it, the rest of the step under way then, the wait until the step
    with its prompt began (more steps, the gaps between them), that step, and the delivery from its
    end to the client."""
    log = phase.step_log.records if phase.step_log else []
    starts = [r.start for r in log]
    own: dict[str, int] = {}
    for i, step in enumerate(log):
        for rid in step.first_tokens:
            own.setdefault(rid, i)
    parts: dict[str, list[float]] = {"lag": [], "under_way": [], "queued": [], "own_step": [], "delivery": []}
    steps_before = []
    for rec in phase.records:
        if (rec.role != role or rec.arrival < warmup or rec.ttft_s is None or rec.submitted is None
                or rec.request_id not in own):
            continue
        step, arrived, submitted = log[own[rec.request_id]], phase.start + rec.arrival, phase.start + rec.submitted
        running = bisect.bisect_right(starts, submitted) - 1  # the step under way (or last ended) at submit
        free_at = max(submitted, log[running].end) if running >= 0 else submitted
        parts["lag"].append(submitted - arrived)
        parts["under_way"].append(free_at - submitted)
        parts["queued"].append(step.start - free_at)
        parts["own_step"].append(step.end - step.start)
        parts["delivery"].append(rec.ttft_s - (step.end - arrived))
        steps_before.append(own[rec.request_id] - running - 1)
    out: dict[str, Any] = {"requests": len(steps_before),
                           "after_more_steps": sum(n > 0 for n in steps_before) / max(len(steps_before), 1)}
    for name, values in parts.items():
        out[name] = {"p50_ms": 1000 * pct(values, 0.5), "p95_ms": 1000 * pct(values, 0.95),
                     "mean_ms": 1000 * sum(values) / len(values) if values else float("nan")}
    return out


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    fair, alone = results["fair"], results["alone"]
    rows: list[tuple[str, str, bool]] = []
    for role in LIGHTS:
        ratio = fair["roles"][role]["ttft_p95_s"] / alone["roles"][role]["ttft_p95_s"]
        rows.append((f"{role} p95 TTFT fair / alone", f"{ratio:.2f}x (bar <= {BARS['light_ttft_ratio']:.0f}x)",
                     ratio <= BARS["light_ttft_ratio"]))
        lost = fair["roles"][role]["rejected"] + fair["roles"][role]["queue_timeouts"]
        rows.append((f"{role} requests refused or timed out", f"{lost} (bar 0)", lost == 0))
    rows.append(("A1 + A2 share of weighted tokens", f"{fair['flood_share']:.1%} (bar >= {BARS['flood_share']:.0%})",
                 fair["flood_share"] >= BARS["flood_share"]))
    at_submit = max(fair["roles"][r]["rejection_call_p99_s"] for r in FLOODS)
    from_arrival = max(fair["roles"][r]["rejection_p99_s"] for r in FLOODS)
    rows.append(("A1/A2 refusal latency p99 at submit (inside Engine.generate)",
                 f"{at_submit * 1000:.2f} ms (bar <= 100 ms; from the scheduled arrival, with this process's "
                 f"event-loop lag: {from_arrival * 1000:.0f} ms)", at_submit <= BARS["rejection_p99_s"]))
    ratio = fair["a2_over_a1_service"]
    rows.append(("A2 : A1 weighted tokens (weights 2 : 1)", f"{ratio:.2f} (bar 2 +- 10%)",
                 abs(ratio / 2.0 - 1.0) <= BARS["weight_ratio_tol"]))
    rows.append(("Jain's index, weight-normalised A1, A2", f"{fair['jain_floods']:.3f} (bar >= 0.95)",
                 fair["jain_floods"] >= BARS["jain"]))
    return rows


def table(results: dict[str, Any], capacity: float) -> str:
    lines = [
        f"Demo model, in-process engine ({', '.join(f'{k}={v}' for k, v in ENGINE_OPTIONS.items())}); capacity "
        f"{capacity:.0f} weighted tokens/s (prompt + 2 x generated; measured in the calibration phase; "
        f"{results['capacity']['closed_loop_weighted_tokens_per_s']:.0f} closed-loop). Roles: "
        + "; ".join(f"{r} = {ADAPTER_OF[r]} (weight {WEIGHTS[r]:g}, prompt {SHAPES[r][0]}, output {SHAPES[r][1]})"
                    for r in ROLES) + ".",
        "",
        "| policy | adapter | offered req/s | arrivals | done | refused | queue timeouts | share of tokens "
        "| weighted tok/s | generated tok/s | TTFT p50 / p95 (s) | refusal from arrival p50 / p99 / max (ms) "
        "| refusal in generate() p99 (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in PHASES:
        for role, r in results[name]["roles"].items():
            refusal = (f"{r['rejection_p50_s'] * 1e3:.1f} / {r['rejection_p99_s'] * 1e3:.1f} / {r['rejection_max_s'] * 1e3:.1f}"
                       if r["rejected"] else "-")
            in_call = f"{r['rejection_call_p99_s'] * 1e3:.2f}" if r["rejected"] else "-"
            lines.append(
                f"| {name} | {role} | {r['offered_per_s']:.1f} | {r['arrivals']} | {r['completed']} | {r['rejected']} "
                f"| {r['queue_timeouts']} | {r['service_share']:.1%} | {r['service_per_s']:.0f} | {r['generated_per_s']:.0f} "
                f"| {_seconds(r['ttft_p50_s'])} / {_seconds(r['ttft_p95_s'])} | {refusal} | {in_call} |"
            )
    policies = ("round_robin", "fair", "fair_mixed_steps")
    lines += ["", "| | " + " | ".join(policies) + " |", "| --- |" + " ---: |" * len(policies)]
    for key, label in (("flood_share", "A1 + A2 share"), ("a2_over_a1_service", "A2 : A1 weighted tokens"),
                       ("jain_floods", "Jain's index (weight-normalised A1, A2)"), ("mean_step_s", "mean engine step (ms)")):
        fmt = {"flood_share": "{:.1%}", "mean_step_s": "{:.1f}"}.get(key, "{:.3f}")
        scale = 1000.0 if key == "mean_step_s" else 1.0
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[name][key] * scale) for name in policies) + " |")
    lines.append(f"| mean engine step, B and C alone (ms) | {results['alone']['mean_step_s'] * 1000:.1f} | | |")
    lines += ["", "Bars (fair policy):", ""]
    lines += [f"- {name}: **{value}** {'met' if ok else '**not met**'}" for name, value, ok in verdicts(results)]
    lines += ["", *breakdown(results)]
    return "\n".join(lines)


def breakdown(results: dict[str, Any]) -> list[str]:
    """Where B's and C's time to first token goes, and what the model steps cost, per phase."""
    lines = [
        "Where B's and C's time to first token goes (ms, p50 / p95 of each part; the parts of one request add "
        "up to its TTFT): this process's lag from the scheduled arrival to Engine.generate, the rest of the "
        "step under way then, the wait for the step with its prompt (more steps before it, gaps between "
        "steps), that step, and the delivery to the client (sampled token to its stream, the event loop); "
        "last, the share of requests whose prompt was not in the first step after they were submitted.",
        "",
        "| phase | adapter | requests | TTFT | lag | step under way | queued | own step | delivery | after more steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("alone", "fair", "fair_mixed_steps"):
        for role, parts in results[name]["ttft_parts"].items():
            r = results[name]["roles"][role]
            cells = [f"{parts[k]['p50_ms']:.1f} / {parts[k]['p95_ms']:.1f}"
                     for k in ("lag", "under_way", "queued", "own_step", "delivery")]
            lines.append(f"| {name} | {role} | {parts['requests']} | {r['ttft_p50_s'] * 1e3:.1f} / {r['ttft_p95_s'] * 1e3:.1f} | "
                         + " | ".join(cells) + f" | {parts['after_more_steps']:.0%} |")
    lines += ["", "Model steps (ModelRunner.run) by kind: count, mean / p95 ms, mean decodes and prefill tokens; gap = "
              "mean time between two steps.", "",
              "| phase | decode-only | prefill-only | mixed | gap (ms) |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("alone", "round_robin", "fair", "fair_mixed_steps"):
        steps = results[name]["model_steps"]
        cells = [f"{k['steps']}: {k['mean_ms']:.1f} / {k['p95_ms']:.1f} ({k['mean_decodes']:.0f} dec, "
                 f"{k['mean_prefill_tokens']:.0f} tok)" if k["steps"] else "-"
                 for k in (steps[kind] for kind in ("decode-only", "prefill-only", "mixed"))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {steps['gap_mean_ms']:.1f} |")
    return lines


def plot(phases: dict[str, Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"A1": "#4c72b0", "A2": "#dd8452", "B": "#55a868", "C": "#c44e52"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, name in zip(axes[0], ("round_robin", "fair")):
        for role, series in phases[name].timeline.items():
            ax.plot([i * BUCKET_S for i in range(len(series))], [v / BUCKET_S for v in series], label=role, color=colors[role])
        ax.set_title(f"{name}: weighted tokens/s per adapter")
        ax.set_xlabel("seconds")
        ax.set_yscale("symlog", linthresh=100)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    data, labels = [], []
    for name in ("alone", "round_robin", "fair", "fair_mixed_steps"):
        for role in ROLES:
            ttft = [r.ttft_s for r in phases[name].records if r.role == role and r.ttft_s is not None]
            if ttft:
                data.append(ttft)
                labels.append(f"{role}\n{name.replace('round_robin', 'rr').replace('fair_mixed_steps', 'mixed')}")
    ax.boxplot(data, whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_title("TTFT (s), whiskers 5th-95th percentile")
    ax = axes[1][1]
    for name, style in (("round_robin", "--"), ("fair", "-")):
        for role in FLOODS:
            rej = sorted(r.rejection_s * 1e3 for r in phases[name].records if r.role == role and r.rejection_s is not None)
            if rej:
                ax.plot(rej, [i / len(rej) for i in range(len(rej))], style, color=colors[role], label=f"{role} {name}")
    ax.axvline(100, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_title("refusal latency from arrival (ms), CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


async def bench(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Phase], float]:
    model = resolve_model("demo")
    make_engine(model, "fair", prefill_first=False).shutdown()  # the last phase's setting reaches the engine
    engine = make_engine(model, "fair")
    vocab = engine.arch.vocab_size
    await engine.complete([9, 10, 11], SamplingParams(max_new_tokens=4))  # warm-up
    closed_loop = await calibrate(engine, args.calibration_s, vocab)
    engine.shutdown()
    rates = {r: FLOOD_FACTOR * closed_loop / request_cost(r) for r in FLOODS}
    floods = poisson_schedule(rates, args.duration_s, seed=11)
    phases: dict[str, Phase] = {}
    results: dict[str, Any] = {}

    async def phase(
        name: str, policy: str, schedule: list[tuple[float, str]], duration: float, offered: dict[str, float],
        prefill_first: bool = True,
    ) -> None:
        engine = make_engine(model, policy, prefill_first)
        await engine.complete([9, 10, 11], SamplingParams(max_new_tokens=4))
        phases[name] = await run_phase(engine, name, schedule, duration, args.warmup_s, vocab)
        results[name] = summarize(phases[name], offered, args.warmup_s)
        results[name]["engine_stats"] = {k: v for k, v in engine.stats().as_dict().items() if k in (
            "steps", "preemptions", "rejected", "queue_timeouts", "aborted", "finished", "max_batch_seqs")}
        engine.shutdown()

    # Capacity under the real traffic: the floods open-loop (refusing ~90% of arrivals costs this
    # process's CPU too) with B and C present at a trickle, since every adapter in a batch adds its
    # LoRA ops to each step. B and C are then offered 10% of it each.
    trickle = poisson_schedule({r: CALIBRATION_LIGHT_RATE for r in LIGHTS}, args.floods_s, seed=13)
    await phase("calibration", "fair", sorted([a for a in floods if a[0] < args.floods_s] + trickle), args.floods_s,
                {**rates, **{r: CALIBRATION_LIGHT_RATE for r in LIGHTS}})
    capacity = sum(phases["calibration"].service.values()) / phases["calibration"].window_s
    rates.update({r: LIGHT_FRACTION * capacity / request_cost(r) for r in LIGHTS})
    lights = poisson_schedule({r: rates[r] for r in LIGHTS}, args.duration_s, seed=12)
    await phase("alone", "fair", [a for a in lights if a[0] < args.alone_s], args.alone_s, rates)
    await phase("round_robin", "round_robin", sorted(floods + lights), args.duration_s, rates)
    await phase("fair", "fair", sorted(floods + lights), args.duration_s, rates)
    await phase("fair_mixed_steps", "fair", sorted(floods + lights), args.duration_s, rates, prefill_first=False)
    results["capacity"] = {"closed_loop_weighted_tokens_per_s": closed_loop, "weighted_tokens_per_s": capacity}
    return results, phases, capacity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results/fairness"))
    args = ap.parse_args()
    args.calibration_s, args.floods_s, args.alone_s, args.duration_s, args.warmup_s = (
        (3, 8, 8, 12, 3) if args.quick else (8, 20, 25, 50, 5)
    )
    results, phases, capacity = asyncio.run(bench(args))
    text = table(results, capacity)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "summary_quick" if args.quick else "summary"
    (args.out / f"{stem}.md").write_text(text + "\n")
    payload = {"capacity_weighted_tokens_per_s": capacity, "engine_options": ENGINE_OPTIONS, "shapes": SHAPES,
               "weights": WEIGHTS, "adapters": ADAPTER_OF, "results": results,
               "verdicts": [dict(zip(("bar", "value", "met"), v)) for v in verdicts(results)]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    plot(phases, args.out / ("fairness_quick.png" if args.quick else "fairness.png"))


if __name__ == "__main__":
    main()
