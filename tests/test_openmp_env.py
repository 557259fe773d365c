"""engine/openmp_env.py: which OpenMP defaults a process lacks, and the re-run of an entry point with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine import openmp_env


def test_missing_keeps_what_the_environment_sets() -> None:
    assert openmp_env.missing({}) == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}
    assert openmp_env.missing({"OMP_WAIT_POLICY": "PASSIVE"}) == {"GOMP_SPINCOUNT": "200000"}
    assert openmp_env.missing({"OMP_WAIT_POLICY": "x", "GOMP_SPINCOUNT": "1"}) == {}


def test_an_entry_point_reruns_itself_once_with_the_defaults(tmp_path: Path) -> None:
    module = tmp_path / "omp_probe.py"
    module.write_text(
        "import os\n"
        "from engine import openmp_env\n"
        "print('run', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
        "openmp_env.added_by_reexec(), flush=True)\n"
        "openmp_env.reexec_with_defaults('omp_probe')\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", openmp_env.ADDED_ENV)}
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}:."
    out = subprocess.run([sys.executable, "-m", "omp_probe"], env=env, capture_output=True, text=True, check=True)
    # First without them, then (re-run, same arguments) with them, and no third time.
    assert out.stdout.splitlines() == ["run None None ()",
                                       "run ACTIVE 200000 ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-m", "omp_probe"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["run PASSIVE None ()", "run PASSIVE 200000 ('GOMP_SPINCOUNT',)"]
    env["GOMP_SPINCOUNT"] = "5"
    out = subprocess.run([sys.executable, "-m", "omp_probe"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["run PASSIVE 5 ()"]
