"""A request's mutable state while the engine works on it. Owned by the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.grammar_mask import RequestGrammar
from engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    adapter_id: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    seed: int | None = None
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_charged: int = 0  # positions charged to the adapter's fair-share counter (recompute is free)
    adapter_slot: int = -1  # device slot while running; -1 = base or not resident
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    first_token_time: float | None = None
    grammar: RequestGrammar | None = None  # structured output: its matcher, advanced by the engine per token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    def token_at(self, position: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[position] if position < p else self.output_ids[position - p]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs and len(self.prompt_logprobs) < len(self.prompt_ids)
