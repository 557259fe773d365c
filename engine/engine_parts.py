"""What an Engine is made of, built from its config: model and tokenizer, KV cache and its block
manager, adapter pool, scheduler, model runner, grammar compiler and output processor.

The wiring in one place; `Engine` (engine/engine.py) and its `EngineCore` (engine/engine_core.py)
own the parts afterwards and change their state only under the core's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from engine import cuda_graphs
from engine.adapter_config import served_base_names
from engine.adapter_pool import AdapterPool
from engine.attention import KVCache
from engine.attention_backend import resolve as resolve_attention_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.fair_share import FairShare
from engine.grammar import GrammarCompiler
from engine.hub import resolve_local_dir
from engine.model import CausalLM
from engine.model_arch import ModelArch
from engine.model_loader import dummy_causal_lm, load_causal_lm
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor, eos_token_ids
from engine.scheduler import Scheduler
from kernels.lora_ops import LoraOps

MAX_MODEL_LEN_DEFAULT_CAP = 8192


@dataclass(frozen=True)
class EngineParts:
    model_dir: Path
    arch: ModelArch
    tokenizer: Any
    model: CausalLM
    eos_token_ids: set[int]
    grammars: GrammarCompiler
    blocks: BlockManager
    kv: KVCache
    max_model_len: int
    output_processor: OutputProcessor
    pool: AdapterPool
    scheduler: Scheduler
    runner: ModelRunner


def build_engine_parts(config: EngineConfig, on_adapter_ready: Callable[[], None]) -> EngineParts:
    """Load the model and size the KV cache; register (and with preload_adapters, read) the listed adapters.

    `on_adapter_ready` is called whenever a background adapter load finishes (it wakes the step loop).
    """
    model_dir = resolve_local_dir(config.model, config.revision, config.hub_cache_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    arch = ModelArch.from_hf_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype, device = config.torch_dtype, config.device
    if config.load_format == "dummy":
        model = dummy_causal_lm(arch, dtype, device, config.seed)
    else:
        model = load_causal_lm(model_dir, arch, dtype, device)
    eos_ids = eos_token_ids(model_dir, hf_config, tokenizer)
    # Structured output: compiled per distinct grammar (cached), in a child process started on first use.
    grammars = GrammarCompiler(tokenizer, arch.vocab_size, sorted(eos_ids))

    bytes_per_block = KVCache.bytes_per_block(arch.num_layers, config.block_size, arch.num_kv_heads, arch.head_dim, dtype)
    attention = resolve_attention_backend(config.attention_backend, device)
    lora_ops = LoraOps(config.lora_backend)
    use_graphs = cuda_graphs.enabled(device, attention, lora_ops.backend, config.enforce_eager)
    # The decode graphs' memory pool comes out of the KV budget, measured before the cache is allocated.
    graph_bytes = 0
    if use_graphs and not config.num_kv_blocks:
        graph_bytes = cuda_graphs.reserved_bytes(model, config.max_num_seqs, config.block_size, torch.device(device))
    num_blocks = config.num_kv_blocks or max(1, (config.kv_cache_bytes - graph_bytes) // bytes_per_block)
    blocks = BlockManager(num_blocks, config.block_size, enable_caching=config.enable_prefix_caching)
    kv = KVCache(arch.num_layers, num_blocks, config.block_size, arch.num_kv_heads, arch.head_dim, dtype, device)
    model_len = config.max_model_len or min(arch.max_position_embeddings, MAX_MODEL_LEN_DEFAULT_CAP)
    # A request must fit the cache on its own, or preemption could never make room for it.
    max_model_len = min(model_len, blocks.capacity_tokens)
    pool = AdapterPool(
        arch,
        config.max_adapter_slots,
        config.max_lora_rank,
        dtype,
        device,
        host_cache_bytes=config.host_cache_bytes,
        hub_cache_dir=config.hub_cache_dir,
        allow_dynamic=config.allow_dynamic_adapters,
        local_roots=config.adapter_source_roots,
        failure_ttl_s=config.adapter_failure_ttl_s,
        on_ready=on_adapter_ready,
        load_timeout_s=config.adapter_load_timeout_s,
        base_model_names=served_base_names(config.model, model_dir),
    )
    for spec in config.adapters:
        pool.register(spec, load_now=config.preload_adapters)
    scheduler = Scheduler(
        blocks, pool, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
        policy=config.scheduling_policy,
        fair_share=FairShare(config.adapter_weights, config.prefill_token_cost, config.decode_token_cost),
        max_waiting_per_adapter=config.max_waiting_per_adapter,
        waiting_slack=config.waiting_slack,
        under_share_prefill_first=config.under_share_prefill_first,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
    )
    runner = ModelRunner(
        model, kv, blocks, pool.slots, lora_ops, device,
        attention_backend=attention, max_num_seqs=config.max_num_seqs,
        max_model_len=max_model_len, use_cuda_graphs=use_graphs,
    )
    return EngineParts(
        model_dir=model_dir, arch=arch, tokenizer=tokenizer, model=model, eos_token_ids=eos_ids, grammars=grammars,
        blocks=blocks, kv=kv, max_model_len=max_model_len,
        output_processor=OutputProcessor(tokenizer, eos_ids, max_model_len),
        pool=pool, scheduler=scheduler, runner=runner,
    )
