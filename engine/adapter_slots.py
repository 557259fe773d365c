"""Device slots: a fixed number of places on the device where adapter weights sit while decoding.

Owns the stacked A/B tensors the LoRA ops index by slot, which adapter occupies each slot, and how
many running sequences pin each slot, and which slot a new adapter takes (an empty one, else the
least recently used unpinned one). A pinned slot is never overwritten.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from engine.adapters import LoraAdapter, weights_digest
from engine.model import LoraWeights
from engine.model_arch import ModelArch


class AdapterSlots:
    def __init__(self, arch: ModelArch, num_slots: int, max_rank: int, dtype: torch.dtype, device: str) -> None:
        self.arch = arch
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.shapes = arch.module_shapes()
        # Per layer: module -> stacked slots. Allocated on the first adapter that targets the module,
        # so a deployment whose adapters only touch q/v never pays for the MLP stacks.
        self.layers: list[dict[str, LoraWeights]] = [{} for _ in range(arch.num_layers)]
        self.occupant: list[str | None] = [None] * num_slots
        # sha256 of the weights each slot holds (LoraAdapter.weights_digest): the prefix cache's identity
        # of what a sequence pinned to the slot computes with.
        self.digest: list[str | None] = [None] * num_slots
        self.pins: list[int] = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))  # least recent first

    def slot_of(self, adapter_id: str) -> int | None:
        try:
            return self.occupant.index(adapter_id)
        except ValueError:
            return None

    def slot_to_fill(self) -> int | None:
        """Where a new adapter goes: an empty slot, else the least recently used unpinned one (None: all pinned)."""
        for slot in self._lru:
            if self.occupant[slot] is None:
                return slot
        for slot in self._lru:
            if self.pins[slot] == 0:
                return slot
        return None

    def touch(self, slot: int) -> None:
        """`slot` was just used: it is reused last."""
        self._lru.move_to_end(slot)

    def _stack(self, layer: int, module: str) -> LoraWeights:
        stack = self.layers[layer].get(module)
        if stack is None:
            in_features, out_features = self.shapes[module]
            s, r = self.num_slots, self.max_rank
            stack = LoraWeights(
                lora_a=torch.zeros(s, r, in_features, dtype=self.dtype, device=self.device),
                # B is stored transposed, [S, R, out] in memory, and handed out as its [S, out, R] view:
                # the expand reads each slot's B^T rows in place (the native CPU op would otherwise
                # transpose B for every run of tokens; Triton and the reference take any strides).
                lora_b=torch.zeros(s, r, out_features, dtype=self.dtype, device=self.device).transpose(1, 2),
                scaling=torch.zeros(s, dtype=torch.float32, device=self.device),
            )
            self.layers[layer][module] = stack
        return stack

    def write(self, slot: int, adapter: LoraAdapter, non_blocking: bool = False) -> None:
        """Copy `adapter` into `slot`, zeroing whatever the previous occupant left in other modules."""
        if self.pins[slot]:
            raise RuntimeError(f"slot {slot} is pinned by {self.pins[slot]} sequences; cannot overwrite")
        for layer, modules in enumerate(self.layers):
            for module, stack in modules.items():
                if (layer, module) not in adapter.weights:
                    stack.lora_a[slot].zero_()
                    stack.lora_b[slot].zero_()
                    stack.scaling[slot] = 0.0
        for (layer, module), w in adapter.weights.items():
            stack = self._stack(layer, module)
            r = w.lora_a.shape[0]
            stack.lora_a[slot, :r].copy_(w.lora_a, non_blocking=non_blocking)
            stack.lora_a[slot, r:].zero_()
            stack.lora_b[slot, :, :r].copy_(w.lora_b, non_blocking=non_blocking)
            stack.lora_b[slot, :, r:].zero_()
            stack.scaling[slot] = w.scaling
        self.occupant[slot] = adapter.adapter_id
        self.digest[slot] = adapter.weights_digest or weights_digest(adapter.weights)

    def clear(self, slot: int) -> None:
        if self.pins[slot]:
            raise RuntimeError(f"slot {slot} is pinned; cannot clear")
        self.occupant[slot] = None
        self.digest[slot] = None

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise RuntimeError(f"slot {slot} unpinned more often than pinned")
        self.pins[slot] -= 1

    @property
    def nbytes(self) -> int:
        return sum(s.lora_a.nbytes + s.lora_b.nbytes + s.scaling.nbytes for m in self.layers for s in m.values())
