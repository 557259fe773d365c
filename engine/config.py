"""Engine configuration: one frozen dataclass, every limit explicit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# engine/scheduler.py implements them; listed here so a config is checked before anything loads
SCHEDULING_POLICIES = ("fair", "round_robin")
# engine/attention_backend.py resolves them (what "auto" means on each device)
ATTENTION_BACKENDS = ("auto", "torch", "native", "triton")
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
    # Prefix caching (vLLM v1's automatic prefix caching, engine/block_manager.py): full KV blocks are
    # reused by later requests with the same leading tokens and the same adapter identity (its id and
    # a sha256 of its weights; the base model is its own). On by default: greedy float32 outputs are
    # token-identical with it on and off (tests/test_prefix_cache.py, tests/test_engine_fidelity.py).
    enable_prefix_caching: bool = True
    kv_cache_bytes: int = 512 * 1024**2
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192)
    # batching
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024
    max_new_tokens_limit: int = 4096
    # fair scheduling under overload (engine/fair_share.py, engine/scheduler.py)
    # "fair": token-fair across adapters (S-LoRA's Virtual Token Counter): admission goes to the
    # waiting adapter that received the least weighted service, preemption takes its victim from the
    # adapter most over its share, and an adapter whose queue head lacks KV blocks does not stop the
    # others. "round_robin": the earlier policy (one admission per adapter queue in turn, admission
    # stops when a head lacks KV blocks, the newest sequence is preempted), kept for comparison.
    scheduling_policy: str = "fair"
    # Service weight per adapter id ("" = the base model), 1.0 for any id not listed: an adapter of
    # weight 2 gets twice the tokens of one of weight 1 while both are backlogged (priority tiers).
    adapter_weights: dict[str, float] = field(default_factory=dict)
    # Service cost of one prompt token and one generated token in the fairness counters (VTC's
    # w_p, w_q; the paper's defaults): a decode token costs a whole model step per token.
    prefill_token_cost: float = 1.0
    decode_token_cost: float = 2.0
    # Waiting requests one adapter may hold (None: no bound of its own, only its share of
    # max_waiting). Beyond it only that adapter is refused (OverloadedError, HTTP 429).
    max_waiting_per_adapter: int | None = None
    # When max_waiting requests wait, an arrival is still accepted if its adapter holds less than its
    # weighted share of max_waiting, up to this many more in all (None: max(1, max_waiting // 8)),
    # so a flood from one adapter (or many) fills the queue only for the floods, never for the rest.
    max_waiting_slack: int | None = None
    # Prefill first for adapters under their share ("fair" policy): when an adapter's queue fills
    # again while others are backlogged (its demand is served as it comes, a flood's is not), its
    # waiting requests have their prompts run in a step of their own, with other such adapters'
    # prompts only; running sequences wait that one step, never two in a row. Its time to first token
    # beside floods is then the step under way plus a short prefill step, not a full step of the
    # floods' decodes and prompt chunks on top of its own prompt.
    under_share_prefill_first: bool = True
    # vLLM's long_prefill_token_threshold: the most tokens one sequence runs in one step (0: only
    # max_num_batched_tokens bounds it), so a long prompt is spread over more, shorter steps.
    long_prefill_token_threshold: int = 0
    # deadlines (None: none). A request still without its first token this long after it arrived
    # fails with QueueTimeoutError (HTTP 503) and frees its queue seat; 60 s: a client retrying
    # after a 503 does better than one waiting minutes in a queue that is not draining.
    max_queue_wait_s: float | None = 60.0
    # A request still running this long after it arrived is stopped with RequestTimeoutError
    # (HTTP 504; its blocks and slot pin are freed, tokens already streamed stand). Off by default as
    # in TGI and vLLM: max_new_tokens and max_model_len already bound every request's length.
    request_timeout_s: float | None = None
    # adapters
    max_lora_rank: int = 64
    max_adapter_slots: int = 32
    allow_dynamic_adapters: bool = False  # LoRAX-style: an unlisted adapter id is loaded on first use
    adapter_source_roots: tuple[str, ...] = ()  # local dirs a dynamic/admin source may come from
    host_cache_bytes: int = 2 * 1024**3  # host (CPU) LRU cache of adapter weights
    preload_adapters: bool = True  # read listed adapters at start (fail fast) instead of on first use
    adapter_failure_ttl_s: float = 30.0  # a failed load is answered from memory this long
    # A load (disk read, Hub download, validation) that takes longer fails its waiting requests
    # and stops holding a loader thread's place (engine/adapter_loads.py).
    adapter_load_timeout_s: float = 60.0
    # kernels: "auto" (Triton on CUDA), "torch", "triton"
    lora_backend: str = "auto"
    # attention: "auto" (Triton paged kernels on CUDA, the native op on the CPU when it builds),
    # "torch" (gather + SDPA, the reference), "native" (CPU only), "triton" (on the CPU: TRITON_INTERPRET=1)
    attention_backend: str = "auto"
    # True: never capture CUDA graphs (every decode step runs eagerly), as vLLM's --enforce-eager.
    # Graphs are only ever used on CUDA with the Triton attention path; the CPU always runs eagerly.
    enforce_eager: bool = False
    seed: int = 0
    # "safetensors": the model directory's weights; "dummy": random weights of the config's shape,
    # made on the device (as vLLM's --load-format dummy) for benchmarks of large shapes.
    load_format: str = "safetensors"
    hub_cache_dir: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def waiting_slack(self) -> int:
        """Requests accepted beyond max_waiting from adapters under their share of it."""
        return max(1, self.max_waiting // 8) if self.max_waiting_slack is None else self.max_waiting_slack

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_adapter_slots < 0:
            raise ValueError(f"max_adapter_slots must be >= 0, got {self.max_adapter_slots}")
        timeout = self.adapter_load_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ValueError(f"adapter_load_timeout_s must be a positive number of seconds, got {timeout!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        self._validate_scheduling()
        ids = [a.adapter_id for a in self.adapters]
        if len(ids) != len(set(ids)):
            raise ValueError(f"adapter ids must be unique, got {ids}")

    def _validate_scheduling(self) -> None:
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {list(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        for adapter_id, weight in self.adapter_weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"adapter_weights[{adapter_id!r}] must be a finite number > 0, got {weight!r}")
        for name in ("prefill_token_cost", "decode_token_cost"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.max_waiting_per_adapter is not None and self.max_waiting_per_adapter < 1:
            raise ValueError(f"max_waiting_per_adapter must be >= 1 or None, got {self.max_waiting_per_adapter}")
        if self.max_waiting_slack is not None and self.max_waiting_slack < 0:
            raise ValueError(f"max_waiting_slack must be >= 0 or None, got {self.max_waiting_slack}")
        if not isinstance(self.under_share_prefill_first, bool):
            raise ValueError(f"under_share_prefill_first must be true or false, got {self.under_share_prefill_first!r}")
        threshold = self.long_prefill_token_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be an integer >= 0 (0: off), got {threshold!r}")
        for name in ("max_queue_wait_s", "request_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value}")


def parse_adapter_weights(text: str) -> dict[str, float]:
    """`id=weight,id2=weight` (an empty id = the base model) -> adapter_weights; names the bad entry."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        adapter_id, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"adapter_weights: expected id=weight with a weight > 0, got {part.strip()!r}")
        weights[adapter_id.strip()] = weight
    return weights
