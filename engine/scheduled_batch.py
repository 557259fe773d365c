"""One step's work as the scheduler hands it to the model runner: what runs, and who was preempted."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to run this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens and so samples one."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class ScheduledBatch:
    prefills: list[ScheduledSeq]  # more than one token each (or the first token of a prompt)
    decodes: list[ScheduledSeq]  # exactly one token each, with KV for everything before it
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefills) + len(self.decodes)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes
