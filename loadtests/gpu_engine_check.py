"""The measuring half of the device check: the engine against HF `generate` and HF + PEFT, same run.

Called by `loadtests/gpu_check.py` (which owns the report); each function fills one report section.

    cuda_graphs        graphs on vs off (`EngineConfig.enforce_eager`): identical tokens, bf16, 7B shape
    engine_throughput  base only, then 30 adapters mixed (rank 16, all 7 projections), plus the decode
                       step's host time (a timer around `engine.runner.run`; on CUDA, torch.profiler's
                       kernel time of a few decode steps: host overhead = step wall time - GPU busy time)
    hf_base            transformers `generate`, base model, one static batch of every request
    hf_peft_mixed      transformers + PEFT, `adapter_names` mixing the adapters, time-capped (`max_time`)

Dummy weights throughout (the engine's `load_format="dummy"`, random init for transformers): the
numbers are speeds, not answers. Imports torch, transformers, peft and this repository; no ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import AdapterSpec, Engine, EngineConfig, SamplingParams
from models.synthetic import build_adapter, build_tokenizer

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MISTRAL_7B: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
    sliding_window=None, tie_word_embeddings=False,
)
# The same architecture, small enough that every section runs on a CPU in seconds (the dry run).
TINY: dict[str, Any] = dict(
    MISTRAL_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)
TOKENIZER_VOCAB = 400  # prompts are token ids below this; generated ids above it detokenize to nothing


@dataclass(frozen=True)
class Workload:
    model: dict[str, Any]
    requests: int
    prompt_tokens: int
    new_tokens: int
    adapters: int
    rank: int
    dtype: str
    device: str
    kv_cache_bytes: int
    graph_requests: int  # the graphs on / off comparison
    graph_new_tokens: int
    hf_peft_cap_s: float  # HF + PEFT mixed runs at most this long
    targets: tuple[str, ...] = ALL_PROJECTIONS

    def reduced(self) -> Workload:
        """Half the requests and new tokens."""
        return dataclasses.replace(self, requests=max(1, self.requests // 2), new_tokens=max(1, self.new_tokens // 2))


# Issue 15's reference workload (H200: HF base 1,315 tok/s, HF + PEFT mixed < 86 tok/s).
SEVEN_B = Workload(
    model=MISTRAL_7B, requests=128, prompt_tokens=450, new_tokens=234, adapters=30, rank=16, dtype="bfloat16",
    device="cuda", kv_cache_bytes=40 * 1024**3, graph_requests=4, graph_new_tokens=64, hf_peft_cap_s=45.0,
)
DRY_RUN = Workload(
    model=TINY, requests=6, prompt_tokens=20, new_tokens=6, adapters=3, rank=4, dtype="float32", device="cpu",
    kv_cache_bytes=64 * 1024**2, graph_requests=2, graph_new_tokens=4, hf_peft_cap_s=5.0,
)


@dataclass(frozen=True)
class Prepared:
    """What every run of one workload shares: the model directory, adapters on disk, the prompts."""

    workload: Workload
    base: Path
    adapters: dict[str, Path]
    prompts: list[list[int]]
    mixed: list[str]  # the adapter of each request in the mixed runs, every adapter as often

    def reduced(self) -> Prepared:
        """The same models with half the requests and new tokens, when the run's budget is short."""
        w = self.workload.reduced()
        return dataclasses.replace(self, workload=w, prompts=self.prompts[: w.requests], mixed=self.mixed[: w.requests])

    def engine(self, adapter_ids: Sequence[str], **overrides: Any) -> Engine:
        """An engine serving `adapter_ids` (all preloaded into device slots), the workload's limits."""
        w = self.workload
        specs = tuple(AdapterSpec(a, str(self.adapters[a])) for a in adapter_ids)
        config = dict(
            model=str(self.base), load_format="dummy", dtype=w.dtype, device=w.device, adapters=specs,
            max_lora_rank=w.rank, max_adapter_slots=max(1, w.adapters), max_num_seqs=w.requests,
            max_num_batched_tokens=8192, kv_cache_bytes=w.kv_cache_bytes,
            max_model_len=w.prompt_tokens + w.new_tokens + 8, host_cache_bytes=16 * 1024**3,
        )
        config.update(overrides)
        return Engine(EngineConfig(**config))


def prepare(workload: Workload, root: Path) -> Prepared:
    from transformers import MistralConfig

    base = root / "base"
    build_tokenizer(base, vocab_size=TOKENIZER_VOCAB)
    MistralConfig(**workload.model, bos_token_id=1, eos_token_id=2).save_pretrained(str(base))
    (base / "model.safetensors").write_bytes(b"")  # the weights come from load_format="dummy"
    adapters = {
        f"a{i}": build_adapter(root / f"a{i}", base, rank=workload.rank, alpha=2.0 * workload.rank,
                               targets=workload.targets, seed=i, std=0.01)
        for i in range(workload.adapters)
    }
    rng = random.Random(0)
    prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(workload.prompt_tokens)] for _ in range(workload.requests)]
    mixed = [f"a{i % workload.adapters}" for i in range(workload.requests)]
    rng.shuffle(mixed)
    return Prepared(workload, base, adapters, prompts, mixed)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _generate(engine: Engine, prompts: list[list[int]], adapter_ids: list[str | None], new_tokens: int) -> list[list[int]]:
    """Greedy, EOS ignored, every request in flight at once; the token ids of each."""

    async def go() -> list[list[int]]:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        outs = await asyncio.gather(*(engine.complete(p, params, a) for p, a in zip(prompts, adapter_ids)))
        return [list(o.token_ids) for o in outs]

    return asyncio.run(go())


def _timed_generate(
    engine: Engine, prompts: list[list[int]], adapter_ids: list[str | None], new_tokens: int, device: str
) -> dict[str, Any]:
    _sync(device)
    start = time.perf_counter()
    tokens = sum(len(t) for t in _generate(engine, prompts, adapter_ids, new_tokens))
    _sync(device)
    seconds = time.perf_counter() - start
    return {"generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


# --------------------------------------------------------------------------------------------------
# the decode step's host time


@dataclass
class StepTimer:
    """Times the engine's model steps that are decode only; on CUDA profiles a few of them.

    It shadows `engine.runner.run` (the one call per step) with a timed wrapper for the duration of a
    `with` block. A step returns after reading its sampled tokens, so its wall time covers all of its
    GPU work; on a profiled step the GPU busy time is the sum of its kernels' device times.
    """

    runner: Any
    cuda: bool
    skip_first: int = 8  # decode steps left alone while the batch fills
    profile_every: int = 16
    max_profiled: int = 6
    decode_steps: int = 0
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    profiled: list[tuple[float, float]] = field(default_factory=list)  # (wall s, GPU busy s)
    profiler_error: str | None = None

    def __enter__(self) -> StepTimer:
        self._run: Callable[[Any], Any] = self.runner.run
        self.runner.run = self._timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runner.run  # the class's method again

    def _timed(self, batch: Any) -> Any:
        if batch.prefills or not batch.decodes:
            return self._run(batch)
        self.decode_steps += 1
        steps = self.decode_steps
        if self.cuda and steps > self.skip_first and steps % self.profile_every == 0 and (
            len(self.profiled) < self.max_profiled
        ):
            return self._profiled(batch)
        return self._plain(batch)

    def _plain(self, batch: Any) -> Any:
        cpu, start = time.thread_time(), time.perf_counter()
        result = self._run(batch)
        self.walls.append(time.perf_counter() - start)
        self.cpus.append(time.thread_time() - cpu)
        return result

    def _profiled(self, batch: Any) -> Any:
        from torch.profiler import ProfilerActivity, profile

        # A profiler that cannot start or be read costs this measurement only, never the step.
        prof = profile(activities=[ProfilerActivity.CUDA])
        try:
            prof.__enter__()
        except Exception as exc:
            self.profiler_error = f"{type(exc).__name__}: {exc}"
            self.cuda = False
            return self._plain(batch)
        start = time.perf_counter()
        try:
            result = self._run(batch)
        finally:
            wall = time.perf_counter() - start
            prof.__exit__(None, None, None)
        try:
            busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        except Exception as exc:
            self.profiler_error, busy_us = f"{type(exc).__name__}: {exc}", 0.0
        self.profiled.append((wall, busy_us * 1e-6))
        return result

    def summary(self) -> dict[str, Any]:
        if not self.walls:
            return {"decode_steps": 0, "profiler_error": self.profiler_error}
        walls = sorted(self.walls)
        out: dict[str, Any] = {
            "decode_steps": len(walls),
            "step_wall_ms_median": round(1e3 * walls[len(walls) // 2], 3),
            "step_thread_cpu_ms_median": round(1e3 * sorted(self.cpus)[len(self.cpus) // 2], 3),
            "profiler_error": self.profiler_error,
        }
        if self.profiled:
            wall = sum(w for w, _ in self.profiled)
            busy = sum(b for _, b in self.profiled)
            out.update(
                profiled_steps=len(self.profiled),
                profiled_wall_ms=round(1e3 * wall / len(self.profiled), 3),
                profiled_gpu_busy_ms=round(1e3 * busy / len(self.profiled), 3),
                # No kernel time at all means the profiler saw no kernels, not a step of pure overhead.
                host_overhead_fraction=round(max(0.0, 1.0 - busy / wall), 4) if busy > 0 else None,
            )
        return out


# --------------------------------------------------------------------------------------------------
# sections


def cuda_graphs(section: dict[str, Any], prep: Prepared) -> None:
    """Graphs on (enforce_eager=False) vs off: the same mixed requests give the same tokens."""
    w = prep.workload
    n = w.graph_requests
    prompts, adapter_ids = prep.prompts[:n], [None if i % 2 else prep.mixed[i] for i in range(n)]
    tokens: dict[str, list[list[int]]] = {}
    for mode, enforce_eager in (("eager", True), ("graphs", False)):
        engine = prep.engine(sorted({a for a in adapter_ids if a is not None}), enforce_eager=enforce_eager)
        try:
            _generate(engine, prompts[:1], adapter_ids[:1], 2)  # compile and capture outside the comparison
            tokens[mode] = _generate(engine, prompts, adapter_ids, w.graph_new_tokens)
        finally:
            engine.shutdown()
            del engine
            _free(w.device)
    differing = [i for i, (a, b) in enumerate(zip(tokens["eager"], tokens["graphs"])) if a != b]
    section.update(requests=n, new_tokens=w.graph_new_tokens, dtype=w.dtype, differing_requests=differing)
    graphs_possible = w.device == "cuda"
    if differing:
        section["status"] = f"fail: {len(differing)}/{n} requests differ between CUDA graphs and eager"
    else:
        section["status"] = "pass" if graphs_possible else "pass: identical (no CUDA: both runs eager)"


def engine_throughput(section: dict[str, Any], prep: Prepared, save: Callable[[], None]) -> None:
    w = prep.workload
    section["workload"] = dict(requests=w.requests, prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens,
                               adapters=w.adapters, rank=w.rank, targets=list(w.targets), dtype=w.dtype)
    engine = prep.engine(list(prep.adapters))
    section["attention_backend"] = engine.runner.attention_backend
    try:
        # Warm-up: Triton compiles (SGMV and BGMV, prefill and decode), graphs are captured.
        _generate(engine, prep.prompts[:4], [None, *prep.mixed[:3]], 4)
        section["base"] = _timed_generate(engine, prep.prompts, [None] * w.requests, w.new_tokens, w.device)
        save()
        with StepTimer(engine.runner, cuda=w.device == "cuda") as timer:
            section["mixed"] = _timed_generate(engine, prep.prompts, list(prep.mixed), w.new_tokens, w.device)
        section["decode_step"] = timer.summary()
        stats = engine.stats()
        section["memory"] = {
            "adapter_slot_bytes": stats.adapters.device_slot_bytes,
            "device_allocated_bytes": torch.cuda.memory_allocated() if w.device == "cuda" else None,
            "adapters_on_device": stats.adapters.adapters_device,
        }
        if w.device == "cuda":
            section["memory"]["adapter_share"] = round(stats.adapters.device_slot_bytes / torch.cuda.memory_allocated(), 4)
    finally:
        engine.shutdown()
        del engine
        _free(w.device)
    ratio = section["mixed"]["tokens_per_s"] / section["base"]["tokens_per_s"]
    section["mixed_over_base"] = round(ratio, 3)
    section["status"] = f"measured: {w.adapters} adapters mixed / base = {ratio:.2f}x"


def _hf_model(prep: Prepared) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    w = prep.workload
    config = AutoConfig.from_pretrained(str(prep.base))
    with torch.device(w.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, w.dtype))
    model.generation_config.eos_token_id = None  # as the engine's ignore_eos
    model.generation_config.pad_token_id = 0
    return model.eval()


def _hf_generate(
    model: Any, prep: Prepared, max_time_s: float, new_tokens: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    w = prep.workload
    new_tokens = w.new_tokens if new_tokens is None else new_tokens
    ids = torch.tensor(prep.prompts, device=w.device)
    _sync(w.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            max_time=max_time_s, **kwargs,
        )
    _sync(w.device)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {
        "generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
        "new_tokens_per_request": out.shape[1] - ids.shape[1], "time_capped": out.shape[1] - ids.shape[1] < new_tokens,
    }


def hf_base(section: dict[str, Any], prep: Prepared, max_time_s: float) -> None:
    model = _hf_model(prep)
    try:
        _hf_generate(model, dataclasses.replace(prep, prompts=prep.prompts[:2]), max_time_s, new_tokens=2)
        section.update(_hf_generate(model, prep, max_time_s))
        section["batch"] = prep.workload.requests
    finally:
        del model
        _free(prep.workload.device)
    section["status"] = "measured"


def hf_peft_mixed(section: dict[str, Any], prep: Prepared, max_time_s: float) -> None:
    """PEFT's mixed-adapter batch (`adapter_names`), random non-zero adapters made in memory."""
    from peft import LoraConfig, get_peft_model

    w = prep.workload
    config = LoraConfig(r=w.rank, lora_alpha=2 * w.rank, target_modules=list(w.targets), init_lora_weights=False)
    model = get_peft_model(_hf_model(prep), config, adapter_name="a0")
    try:
        for name in list(prep.adapters)[1:]:
            model.add_adapter(name, config)
        model.eval()
        section.update(_hf_generate(model, prep, max_time_s, adapter_names=list(prep.mixed)))
        section["adapters"] = w.adapters
    finally:
        del model
        _free(w.device)
    section["status"] = f"measured (capped at {max_time_s:.0f} s)"
