"""Engine configuration: one frozen dataclass, every limit explicit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter the engine serves: its public id and where its files are (local dir or Hub id)."""

    adapter_id: str
    source: str
    revision: str | None = None

    @staticmethod
    def parse(text: str) -> AdapterSpec:
        """`id=path` or a bare `id` (then the id is also the source), as TGI's LORA_ADAPTERS."""
        text = text.strip()
        if "=" in text:
            adapter_id, source = text.split("=", 1)
            return AdapterSpec(adapter_id.strip(), source.strip())
        return AdapterSpec(text, text)

    @staticmethod
    def parse_list(text: str) -> tuple[AdapterSpec, ...]:
        return tuple(AdapterSpec.parse(part) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    # KV cache
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 512 * 1024**2
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192)
    # batching
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024
    max_new_tokens_limit: int = 4096
    # adapters
    max_lora_rank: int = 64
    max_adapter_slots: int = 32
    allow_dynamic_adapters: bool = False  # LoRAX-style: an unlisted adapter id is loaded on first use
    adapter_source_roots: tuple[str, ...] = ()  # local dirs a dynamic/admin source may come from
    host_cache_bytes: int = 2 * 1024**3  # host (CPU) LRU cache of adapter weights
    preload_adapters: bool = True  # read listed adapters at start (fail fast) instead of on first use
    adapter_failure_ttl_s: float = 30.0  # a failed load is answered from memory this long
    # kernels: "auto" (Triton on CUDA), "torch", "triton"
    lora_backend: str = "auto"
    seed: int = 0
    # "safetensors": the model directory's weights; "dummy": random weights of the config's shape,
    # made on the device (as vLLM's --load-format dummy) for benchmarks of large shapes.
    load_format: str = "safetensors"
    hub_cache_dir: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_adapter_slots < 0:
            raise ValueError(f"max_adapter_slots must be >= 0, got {self.max_adapter_slots}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        ids = [a.adapter_id for a in self.adapters]
        if len(ids) != len(set(ids)):
            raise ValueError(f"adapter ids must be unique, got {ids}")
