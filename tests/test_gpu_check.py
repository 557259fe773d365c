"""The prepared device check runs end to end on the CPU (--dry-run), so it runs first time on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import gpu_check

SECTIONS = ["fidelity", "bgmv_bandwidth", "prepare", "cuda_graphs", "engine_throughput", "hf_base",
            "hf_peft_mixed", "bgmv_tiling_sweep", "bars"]


@pytest.mark.slow
def test_dry_run_fills_every_section_and_writes_the_report_to_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--dry-run", "--results-dir", str(tmp_path / "not-used")]) == 0

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert not section["status"].startswith(("fail", "error", "running")), (name, section)
    assert not (tmp_path / "not-used").exists()

    fidelity = report["sections"]["fidelity"]
    assert fidelity["tests"] > 100 and fidelity["skipped"] == fidelity["tests"], "gpu tests collected, skipped on CPU"
    assert "-m gpu" in fidelity["command"]

    workload = gpu_check.engine_check.DRY_RUN
    throughput = report["sections"]["engine_throughput"]
    expected_tokens = workload.requests * workload.new_tokens
    assert throughput["base"]["generated_tokens"] == expected_tokens
    assert throughput["mixed"]["generated_tokens"] == expected_tokens
    assert throughput["decode_step"]["decode_steps"] >= workload.new_tokens - 1
    assert throughput["memory"]["adapters_on_device"] == workload.adapters
    assert report["sections"]["hf_base"]["generated_tokens"] == expected_tokens
    assert report["sections"]["hf_peft_mixed"]["generated_tokens"] == expected_tokens
    assert report["sections"]["cuda_graphs"]["differing_requests"] == []

    sweep = report["sections"]["bgmv_tiling_sweep"]["results"]
    assert len(sweep) == 2 and all(row["shrink_fraction"] >= 0 for row in sweep)
    assert [row["bar"] for row in report["sections"]["bars"]["results"]] == list(gpu_check.BARS)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}" in markdown for name in SECTIONS)


def test_bars_compare_the_measured_ratios() -> None:
    sections = {
        "engine_throughput": {"base": {"tokens_per_s": 1000.0}, "mixed": {"tokens_per_s": 950.0},
                              "decode_step": {"host_overhead_fraction": 0.2}},
        "hf_base": {"tokens_per_s": 300.0},
        "hf_peft_mixed": {"tokens_per_s": 50.0},
        "bgmv_bandwidth": {"worst_fraction_of_copy": 0.6},
    }
    section: dict[str, object] = {}
    gpu_check.bars(section, sections)
    met = {row["bar"]: row["met"] for row in section["results"]}  # type: ignore[index, union-attr]
    assert met == {
        "mixed_over_base": True,  # 0.95
        "mixed_over_hf_peft_mixed": True,  # 19x
        "mixed_over_hf_base": True,  # 3.17x
        "decode_host_overhead_below": False,  # 20 % of the step
        "bgmv_fraction_of_copy": True,
    }


def test_junit_counts_reads_failures(tmp_path: Path) -> None:
    junit = tmp_path / "r.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels" name="test_b"/>'
        '<testcase classname="tests.test_kernels" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, failed = gpu_check.junit_counts(junit)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert failed == ["tests.test_kernels::test_a"]


class _Runner:
    def __init__(self) -> None:
        self.steps = 0

    def run(self, batch: object) -> int:
        self.steps += 1
        return self.steps


class _Batch:
    def __init__(self, prefills: list[int], decodes: list[int]) -> None:
        self.prefills, self.decodes = prefills, decodes


@pytest.mark.parametrize("cuda", [False, True], ids=["timer", "profiler-path"])
def test_step_timer_times_decode_steps_only_and_never_changes_a_result(cuda: bool) -> None:
    from loadtests.gpu_engine_check import StepTimer

    runner = _Runner()
    batches = [_Batch([1], [])] + [_Batch([], [1, 2])] * 40 + [_Batch([1], [2])]
    with StepTimer(runner, cuda=cuda, skip_first=2, profile_every=4, max_profiled=3) as timer:
        results = [runner.run(b) for b in batches]
    assert results == list(range(1, len(batches) + 1))
    assert "run" not in vars(runner)  # the class's method again
    summary = timer.summary()
    assert timer.decode_steps == 40
    assert summary["decode_steps"] + len(timer.profiled) == 40
    assert len(timer.profiled) == (3 if cuda and timer.profiler_error is None else 0)
