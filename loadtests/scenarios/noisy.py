"""The noisy-neighbour scenario's roles, phases and bars, without importing locust (the runner and the
locustfile share them; see loadtests/locustfile_noisy.py).

The same roles as loadtests/bench_fairness.py, over HTTP against `serve run`: A1 and A2 flood (each
offered several times what the replica can serve), B and C each send about a tenth of it. First
B and C run alone (their baseline), then the floods join.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    name: str
    adapter: str  # a demo adapter (models/demo.py)
    weight: float  # its fair-share weight (NOISY_APP_ARGS)
    prompt_chars: int  # the demo tokenizer is byte-level: about one token per character
    max_new_tokens: int
    flood: bool


ROLES = (
    Role("A1", "qv-r4", 1.0, 384, 16, flood=True),  # long prompts, short outputs
    Role("A2", "attn-r8", 2.0, 16, 160, flood=True),  # short prompts, long outputs
    Role("B", "mlp-r16", 1.0, 48, 24, flood=False),
    Role("C", "o-r2", 1.0, 24, 48, flood=False),
)
ROLE_OF_ADAPTER = {r.adapter: r for r in ROLES}

ALONE_END = 0.3  # fraction of the run with B and C alone; the floods run from there to the end
WARMUP_S = 5.0  # left out of each phase's statistics: the switch between phases settles meanwhile
FLOOD_WARMUP_S = 10.0  # the floods fill their queues and the fairness counters catch up

# What the replica runs with (config.yaml's first application, model demo): one replica (no
# autoscaling: the alone and flood phases must see the same capacity), the floods' weights 1 and 2,
# a per-adapter waiting bound so that a flood is refused at arrival, never queued without bound.
NOISY_APP_ARGS: dict[str, object] = {
    "autoscaling_config": None,  # None: removed from the config
    "model_replicas": 1,
    "replica_num_cpus": 1,
    "max_num_seqs": 32,
    "max_num_batched_tokens": 128,  # as loadtests/bench_fairness.py: it bounds an arrival's wait for the step under way
    "num_kv_blocks": 1024,
    "max_model_len": 1024,
    "max_waiting": 256,
    "max_waiting_per_adapter": 16,
    "adapter_weights": {r.adapter: r.weight for r in ROLES},
    "prefill_token_cost": 1.0,  # the engine's defaults, spelled out: the report weighs tokens with them
    "decode_token_cost": 2.0,
}

# Bars (issue 13): B's and C's p95 TTFT with the floods at most 2x their p95 alone, none of their
# requests refused or failed, the floods' excess refused within 100 ms of arrival.
TTFT_RATIO_BAR = 2.0
REFUSAL_P99_BAR_S = 0.100


def noisy_phases(duration_s: float) -> list[tuple[str, float, float]]:
    """(name, start s, end s) of the two phases, as run (statistics leave out each one's warm-up)."""
    split = duration_s * ALONE_END
    return [("alone", 0.0, split), ("flood", split, duration_s)]


def measured_window(name: str, start_s: float, end_s: float) -> tuple[float, float]:
    return (start_s + (FLOOD_WARMUP_S if name == "flood" else WARMUP_S), end_s)
