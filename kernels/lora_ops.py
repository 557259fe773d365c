"""The one LoRA API the engine calls: picks Triton on CUDA, the torch reference elsewhere.

`LoraOps(backend)` with backend "auto" (Triton when the tensors are on CUDA and Triton imports),
"torch" (always the reference) or "triton" (always Triton; on CPU that needs TRITON_INTERPRET=1).
The environment variable LORA_KERNEL_BACKEND overrides "auto" the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from kernels import reference

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class LoraBatch:
    """Per-step LoRA metadata, built once and shared by every LoRA layer of the step.

    Rows [0, num_prefill_tokens) are prefill chunks, grouped into segments of one slot (SGMV);
    the rows after them are decode tokens, one slot index each (BGMV). Slot -1 means "no adapter".
    """

    token_slots: torch.Tensor  # [T] int64
    num_prefill_tokens: int
    seg_starts: torch.Tensor  # [G] int64, segments over the prefill rows
    seg_lens: torch.Tensor  # [G] int64
    seg_slots: torch.Tensor  # [G] int64
    any_adapter: bool

    @staticmethod
    def build(token_slots: list[int], num_prefill_tokens: int, device: torch.device | str) -> LoraBatch:
        starts: list[int] = []
        lens: list[int] = []
        slots: list[int] = []
        for i in range(num_prefill_tokens):
            slot = token_slots[i]
            if slots and slots[-1] == slot and starts[-1] + lens[-1] == i:
                lens[-1] += 1
            else:
                starts.append(i)
                lens.append(1)
                slots.append(slot)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return LoraBatch(
            token_slots=as_tensor(token_slots),
            num_prefill_tokens=num_prefill_tokens,
            seg_starts=as_tensor(starts),
            seg_lens=as_tensor(lens),
            seg_slots=as_tensor(slots),
            any_adapter=any(s >= 0 for s in token_slots),
        )


def _load_triton() -> ModuleType:
    from kernels import triton_lora  # imported lazily: triton is optional on CPU

    return triton_lora


class LoraOps:
    """Shrink/expand over a mixed batch; one instance per model runner."""

    def __init__(self, backend: str = "auto") -> None:
        backend = os.environ.get("LORA_KERNEL_BACKEND", backend) if backend == "auto" else backend
        if backend not in BACKENDS:
            raise ValueError(f"lora kernel backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._triton: ModuleType | None = None

    def impl_for(self, x: torch.Tensor) -> ModuleType:
        if self.backend == "torch":
            return reference
        if self.backend == "triton" or x.is_cuda:
            if self._triton is None:
                try:
                    self._triton = _load_triton()
                except ImportError:
                    if self.backend == "triton":
                        raise
                    return reference
            return self._triton
        return reference

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        batch: LoraBatch,
        slice_offset: int = 0,
    ) -> None:
        """out[:, slice_offset : slice_offset + out_features] += scale * (x @ A^T) @ B^T, per token's slot."""
        if not batch.any_adapter:
            return
        impl = self.impl_for(x)
        p = batch.num_prefill_tokens
        if p > 0:
            h = impl.sgmv_shrink(x[:p], lora_a, batch.seg_starts, batch.seg_lens, batch.seg_slots)
            impl.sgmv_expand(
                h, lora_b, batch.seg_starts, batch.seg_lens, batch.seg_slots, scaling, out[:p], slice_offset
            )
        if p < x.shape[0]:
            slots = batch.token_slots[p:]
            h = impl.bgmv_shrink(x[p:], lora_a, slots)
            impl.bgmv_expand(h, lora_b, slots, scaling, out[p:], slice_offset)

