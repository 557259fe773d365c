"""The one prepared device check (issue 15): fidelity on CUDA, then throughput on the Mistral-7B shape.

    PYTHONPATH=. python loadtests/gpu_check.py               # on the GPU machine: under 8 minutes on an H200
    PYTHONPATH=. python loadtests/gpu_check.py --dry-run     # anywhere: every section at tiny shapes, on the CPU

Sections, in order; the report (gpu_check.json and gpu_check.md, in $OUT when set, else --results-dir)
is rewritten after every section, so a run stopped by a timeout keeps what it had:

    fidelity           `pytest -m gpu` over the kernel and engine test files: Triton LoRA (SGMV / BGMV)
                       and paged attention vs their references at large shapes, torch's sync detector,
                       the engine on CUDA vs transformers + PEFT (graphs on and off). Correctness lives
                       in those tests only; this script reads their JUnit report.
    bgmv_bandwidth     BGMV shrink / expand bytes per second (batch 64, rank 16, hidden 4096, one adapter
                       per token, L2 defeated) over a measured device-to-device copy's
    cuda_graphs        graphs on vs off: identical tokens, bf16, 7B shape, a few requests
    engine_throughput  128 requests, 450 prompt / 234 new tokens: base only, 30 adapters mixed, decode step
                       host time (loadtests/gpu_engine_check.py)
    hf_base            transformers `generate`, one static batch of 128
    hf_peft_mixed      transformers + PEFT, 30 adapters mixed, time-capped
    bgmv_tiling_sweep  candidate `kernels.tuning.LoraTiling`s, each through its own `TritonLora`: what to
                       put in `kernels.tuning.TABLE` for this device (only when time is left)
    bars               issue 15's GPU bars against the numbers above

Imports no ray, serve_app or gguf (the device image has none of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # Before triton's first import: without a GPU the kernels must be decorated for the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python loadtests/gpu_check.py` without PYTHONPATH=.
    sys.path.insert(0, str(REPO_ROOT))

from kernels.triton_lora import TritonLora  # noqa: E402
from kernels.tuning import LoraTiling, device_key, tuning_for  # noqa: E402
from loadtests import gpu_engine_check as engine_check  # noqa: E402

GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_attention_kernels.py", "tests/test_engine_triton.py")
# Issue 15's GPU bars.
BARS = {
    "mixed_over_base": 0.90,
    "mixed_over_hf_peft_mixed": 15.0,
    "mixed_over_hf_base": 3.0,
    "decode_host_overhead_below": 0.10,
    "bgmv_fraction_of_copy": 0.50,
}
SWEEP = [LoraTiling(tile_elems=t, bgmv_num_warps=w, programs_per_sm=p) for t in (2048, 4096, 8192) for w in (4, 8)
         for p in (2, 4)]


# --------------------------------------------------------------------------------------------------
# the report


class Report:
    """Sections in run order, saved as JSON and Markdown after each one."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.sections: dict[str, dict[str, Any]] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def remaining_s(self) -> float:
        return self.meta["deadline_unix"] - time.time()

    def run(self, name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        section: dict[str, Any] = {"status": "running"}
        self.sections[name] = section
        self.save()
        started = time.perf_counter()
        try:
            fn(section)
        except Exception as exc:  # one broken section must not lose the others
            section["status"] = f"error: {type(exc).__name__}: {exc}"
            section["traceback"] = traceback.format_exc(limit=12)
        section["seconds"] = round(time.perf_counter() - started, 2)
        print(f"[gpu_check] {name}: {section['status']} ({section['seconds']} s)", flush=True)
        self.save()
        return section

    def skip(self, name: str, why: str) -> None:
        self.sections[name] = {"status": f"skipped: {why}"}
        print(f"[gpu_check] {name}: skipped: {why}", flush=True)
        self.save()

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.time() - self.meta["started_unix"], 1)
        data = {"meta": self.meta, "summary": {k: s.get("status", "?") for k, s in self.sections.items()},
                "sections": self.sections}
        (self.directory / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (self.directory / "gpu_check.md").write_text(render_markdown(data))

    def failed(self) -> bool:
        return any(s.get("status", "").startswith(("fail", "error")) for s in self.sections.values())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3) else f"{value:.4g}"
    return str(value)


def render_markdown(data: dict[str, Any]) -> str:
    lines = ["# GPU check", ""]
    lines += [f"- **{k}**: {_fmt(v)}" for k, v in data["meta"].items()]
    lines += ["", "## Summary", ""] + [f"- **{k}**: {v}" for k, v in data["summary"].items()]
    for name, section in data["sections"].items():
        lines += ["", f"## {name}", ""]
        for key, value in section.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                columns = list(dict.fromkeys(c for row in value for c in row))
                lines += ["", f"**{key}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in value]
                lines.append("")
            elif isinstance(value, dict):
                lines.append(f"- **{key}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()))
            elif key in ("traceback", "output_tail"):
                lines += ["", "```", str(value).rstrip(), "```"]
            else:
                lines.append(f"- **{key}**: {_fmt(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# fidelity: pytest


def fidelity(section: dict[str, Any], results: Path, timeout_s: float, dry_run: bool) -> None:
    """`pytest -m gpu` in a child process; the verdict is its JUnit report's, nothing is re-checked here."""
    junit = results / "gpu_pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={junit}",
               *GPU_TEST_FILES]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    section["command"] = " ".join(command[1:])
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # its output is bytes whatever `text` says
        section["status"] = f"fail: pytest ran past {timeout_s:.0f} s"
        section["output_tail"] = (exc.stdout or b"")[-3000:].decode(errors="replace")
        return
    section["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    counts, failed = junit_counts(junit)
    section.update(counts)
    section["failed_tests"] = failed[:20]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]:  # 5: nothing collected
        section["status"] = f"fail: pytest exit {proc.returncode}, {counts['failures'] + counts['errors']} failed"
    elif passed == 0:
        section["status"] = ("pass: collected, all skipped (no CUDA)" if dry_run or not torch.cuda.is_available()
                             else "fail: every gpu test was skipped on a CUDA machine")
    else:
        section["status"] = f"pass: {passed} gpu tests passed"


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """(tests, failures, errors, skipped) of a JUnit XML file, and the ids of the failed tests."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not path.exists():
        return counts, []
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts, failed


# --------------------------------------------------------------------------------------------------
# BGMV bandwidth and the tiling sweep


def _per_call_s(call: Callable[[int], None], n_sets: int, iters: int, device: torch.device) -> float:
    """Seconds per call launched back to back from Python (host launch cost included)."""
    for i in range(2 * n_sets):
        call(i % n_sets)
    if device.type != "cuda":
        start = time.perf_counter()
        for i in range(iters):
            call(i % n_sets)
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for i in range(iters):
        call(i % n_sets)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e-3 / iters


def _graph_per_call_s(call: Callable[[int], None], n_sets: int, replays: int) -> float:
    """Seconds per call on the device alone: one CUDA graph of n_sets calls, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e-3 / (replays * n_sets)


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy throughput in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _per_call_s(lambda _i: dst.copy_(src), 1, 20, device)
    return 2 * nbytes / seconds


class BgmvBench:
    """A decode batch with a distinct adapter per token, and enough weight copies to defeat the L2.

    Every token reads its own A / B slice, so the bytes of the slices read are also the DRAM traffic;
    calls rotate through n_sets disjoint slot ranges so that no call finds its slices in the L2.
    """

    def __init__(self, tokens: int, rank: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        l2_bytes = 50 * 2**20
        if device.type == "cuda":
            l2_bytes = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", l2_bytes) or l2_bytes)
        elt = torch.empty(0, dtype=dtype).element_size()
        self.n_sets = min(64, max(2, math.ceil(3 * l2_bytes / (tokens * rank * hidden * elt))))
        if device.type != "cuda":
            self.n_sets = 2
        self.tokens, self.rank, self.hidden, self.elt, self.device = tokens, rank, hidden, elt, device
        gen = torch.Generator(device=device).manual_seed(1)

        def rand(*shape: int) -> torch.Tensor:
            return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)

        slots = tokens * self.n_sets
        self.lora_a, self.lora_b = rand(slots, rank, hidden), rand(slots, hidden, rank)
        self.scaling = torch.full((slots,), 0.5, device=device)
        self.x = [rand(tokens, hidden) for _ in range(self.n_sets)]
        self.h = [rand(tokens, rank) for _ in range(self.n_sets)]
        self.out = [torch.zeros(tokens, hidden, dtype=dtype, device=device) for _ in range(self.n_sets)]
        self.slots = [torch.randperm(tokens, generator=gen, device=device) + s * tokens for s in range(self.n_sets)]

    def shrink_bytes(self) -> int:
        t, r, k = self.tokens, self.rank, self.hidden
        return (t * r * k + t * k + t * r) * self.elt  # A slices + x + h

    def expand_bytes(self) -> int:
        t, r, n = self.tokens, self.rank, self.hidden
        return (t * n * r + t * r + 2 * t * n) * self.elt  # B slices + h + out read and written

    def measure(self, impl: Any, copy_bw: float, replays: int) -> dict[str, dict[str, float]]:
        calls = {
            "shrink": (lambda i: impl.bgmv_shrink(self.x[i], self.lora_a, self.slots[i]), self.shrink_bytes()),
            "expand": (lambda i: impl.bgmv_expand(self.h[i], self.lora_b, self.slots[i], self.scaling, self.out[i]),
                       self.expand_bytes()),
        }
        result: dict[str, dict[str, float]] = {}
        for op, (call, nbytes) in calls.items():
            eager_s = _per_call_s(call, self.n_sets, replays * self.n_sets, self.device)
            device_s = _graph_per_call_s(call, self.n_sets, replays) if self.device.type == "cuda" else eager_s
            result[op] = {
                "bytes": nbytes,
                "device_us": round(device_s * 1e6, 2),
                "eager_us": round(eager_s * 1e6, 2),
                "GBps": round(nbytes / device_s / 1e9, 2),
                "fraction_of_copy": round(nbytes / device_s / copy_bw, 3),
                "eager_fraction_of_copy": round(nbytes / eager_s / copy_bw, 3),
            }
        return result


def bgmv_bandwidth(section: dict[str, Any], dry_run: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, rank, hidden = (4, 4, 64) if dry_run else (64, 16, 4096)
    copy_bw = copy_bandwidth(2**22 if dry_run else 2**30, device)
    section["copy_bandwidth_GBps"] = round(copy_bw / 1e9, 1)
    section["shape"] = f"batch {tokens}, rank {rank}, hidden {hidden}, one adapter per token"
    section["tiling"] = asdict(tuning_for(device).lora) | {"table_entry": device_key(device)}
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        bench = BgmvBench(tokens, rank, hidden, dtype, device)
        section["l2_rotation_sets"] = bench.n_sets
        for op, m in bench.measure(TritonLora(), copy_bw, 2 if dry_run else 20).items():
            rows.append({"dtype": str(dtype).removeprefix("torch."), "op": op, **m})
    section["results"] = rows
    worst = min(row["fraction_of_copy"] for row in rows)
    section["worst_fraction_of_copy"] = worst
    what = "Triton BGMV" if device.type == "cuda" else "Triton's CPU interpreter (not a GPU number)"
    section["status"] = f"measured: {what}, worst {worst:.2f} of copy bandwidth"


def bgmv_tiling_sweep(section: dict[str, Any], dry_run: bool) -> None:
    """Each candidate tiling through its own TritonLora; nothing global changes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, rank, hidden = (4, 4, 64) if dry_run else (64, 16, 4096)
    candidates = SWEEP[:2] if dry_run else SWEEP
    copy_bw = copy_bandwidth(2**22 if dry_run else 2**30, device)
    bench = BgmvBench(tokens, rank, hidden, torch.bfloat16, device)
    current = tuning_for(device).lora
    rows = []
    for tiling in candidates:
        m = bench.measure(TritonLora(tiling), copy_bw, 1 if dry_run else 5)
        rows.append({**asdict(tiling), "current": tiling == current, "shrink_fraction": m["shrink"]["fraction_of_copy"],
                     "expand_fraction": m["expand"]["fraction_of_copy"]})
    section["results"] = rows
    best = max(rows, key=lambda r: min(r["shrink_fraction"], r["expand_fraction"]))
    section["best"] = {k: best[k] for k in ("tile_elems", "bgmv_num_warps", "programs_per_sm")}
    section["status"] = f"measured: best for {device_key(device)} in kernels.tuning.TABLE terms: {section['best']}"


# --------------------------------------------------------------------------------------------------
# bars


def _tokens_per_s(sections: dict[str, dict[str, Any]], name: str, run: str | None = None) -> float | None:
    found: Any = sections.get(name, {})
    if run is not None:
        found = found.get(run, {})
    return found.get("tokens_per_s") if isinstance(found, dict) else None


def bars(section: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    mixed, base = _tokens_per_s(sections, "engine_throughput", "mixed"), _tokens_per_s(sections, "engine_throughput", "base")
    hf_base, hf_peft = _tokens_per_s(sections, "hf_base"), _tokens_per_s(sections, "hf_peft_mixed")
    overhead = sections.get("engine_throughput", {}).get("decode_step", {}).get("host_overhead_fraction")
    bandwidth = sections.get("bgmv_bandwidth", {}).get("worst_fraction_of_copy")
    measured = {
        "mixed_over_base": mixed / base if mixed and base else None,
        "mixed_over_hf_peft_mixed": mixed / hf_peft if mixed and hf_peft else None,
        "mixed_over_hf_base": mixed / hf_base if mixed and hf_base else None,
        "decode_host_overhead_below": overhead,
        "bgmv_fraction_of_copy": bandwidth,
    }
    rows, missing, failed = [], [], []
    for name, bar in BARS.items():
        value = measured[name]
        if value is None:
            missing.append(name)
            rows.append({"bar": name, "needed": bar, "measured": "n/a", "met": "n/a"})
            continue
        met = value < bar if name == "decode_host_overhead_below" else value >= bar
        rows.append({"bar": name, "needed": bar, "measured": round(value, 3), "met": met})
        if not met:
            failed.append(name)
    section["results"] = rows
    if not torch.cuda.is_available():
        section["status"] = "skipped: no CUDA (dry run numbers are not GPU numbers)"
    elif failed:
        section["status"] = f"fail: {', '.join(failed)}" + (f"; not measured: {', '.join(missing)}" if missing else "")
    else:
        section["status"] = "pass" + (f"; not measured: {', '.join(missing)}" if missing else "")


# --------------------------------------------------------------------------------------------------


def _meta(budget_s: float, dry_run: bool) -> dict[str, Any]:
    import triton

    meta: dict[str, Any] = {
        "dry_run": dry_run, "cuda": torch.cuda.is_available(), "started_unix": time.time(),
        "deadline_unix": time.time() + budget_s, "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny shapes on the CPU (seconds)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "loadtests" / "results" / "gpu_check"),
                        help="where the report goes when $OUT is not set")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out (e.g. fidelity)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --dry-run")
    results = Path(os.environ.get("OUT") or args.results_dir)
    report = Report(results, _meta(args.budget_s, args.dry_run))
    workload = engine_check.DRY_RUN if args.dry_run else engine_check.SEVEN_B

    def wanted(name: str, needs_s: float) -> bool:
        if name in skip:
            report.skip(name, "--skip")
            return False
        if report.remaining_s() < needs_s:
            report.skip(name, f"{report.remaining_s():.0f} s of the budget left, needs about {needs_s:.0f} s")
            return False
        return True

    if wanted("fidelity", 0):
        report.run("fidelity", lambda s: fidelity(s, results, max(60.0, min(210.0, report.remaining_s() - 240)),
                                                  args.dry_run))
    if wanted("bgmv_bandwidth", 10):
        report.run("bgmv_bandwidth", lambda s: bgmv_bandwidth(s, args.dry_run))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        prepared: list[engine_check.Prepared] = []

        def prepare(section: dict[str, Any]) -> None:
            prepared.append(engine_check.prepare(workload, Path(root)))
            section.update(status="ok", adapters_on_disk=workload.adapters, model=workload.model)

        report.run("prepare", prepare)
        if not prepared:
            print("[gpu_check] nothing to measure the engine with; see the prepare section", flush=True)
            return _finish(report, results)
        prep = prepared[0]
        if wanted("cuda_graphs", 30 if not args.dry_run else 0):
            report.run("cuda_graphs", lambda s: engine_check.cuda_graphs(s, prep))
        if report.remaining_s() < 150 and not args.dry_run:
            prep = prep.reduced()  # the report's workload entry says so
        if wanted("engine_throughput", 40 if not args.dry_run else 0):
            report.run("engine_throughput", lambda s: engine_check.engine_throughput(s, prep, report.save))
        if wanted("hf_base", 20 if not args.dry_run else 0):
            cap = max(5.0, min(60.0, report.remaining_s() - 70))
            report.run("hf_base", lambda s: engine_check.hf_base(s, prep, cap))
        if wanted("hf_peft_mixed", 20 if not args.dry_run else 0):
            cap = max(5.0, min(workload.hf_peft_cap_s, report.remaining_s() - 30))
            report.run("hf_peft_mixed", lambda s: engine_check.hf_peft_mixed(s, prep, cap))
    if wanted("bgmv_tiling_sweep", 25 if not args.dry_run else 0):
        report.run("bgmv_tiling_sweep", lambda s: bgmv_tiling_sweep(s, args.dry_run))
    return _finish(report, results)


def _finish(report: Report, results: Path) -> int:
    report.run("bars", lambda s: bars(s, report.sections))
    print(f"[gpu_check] report: {results / 'gpu_check.md'}", flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
