"""OpenMP settings for an engine whose steps run on a thread of their own (engine/engine_core.py).

libgomp (torch's OpenMP) keeps one worker pool per thread that starts parallel regions. Once a second
thread has one (the caller loaded the model and packed the weights on its own thread; the engine's
step thread runs every op after that), there are more OpenMP threads than cores, and libgomp then
lets an idle worker spin only ~100 iterations before it sleeps: every parallel region of a step (a
few hundred per step) pays a futex wake-up. Measured on the 2-core machine: a 64-row LoRA op 64 us
instead of 17, an add over 200K floats 54 us instead of 9, a 576 x 3072 linear +6%, so that the
adapters-mixed case lost 5% against base only to wake-ups alone. `OMP_WAIT_POLICY=ACTIVE` with a
bounded `GOMP_SPINCOUNT` keeps workers spinning for a short while (about a tenth of a millisecond)
between the regions of a step and asleep between steps.

libgomp reads these once, when torch loads it, so they must be in the environment before `import
torch`: serve_app passes them to the model replicas (Ray's runtime_env), and command-line entry
points re-run themselves with them (`reexec_with_defaults`). Values the user set are kept.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}
# Set by `reexec_with_defaults` in the re-run process: which of DEFAULTS it added (so a benchmark can
# leave them out of a peer's environment) and that the re-run already happened.
ADDED_ENV = "LORASERVE_OPENMP_ADDED"


def missing(env: dict[str, str] | None = None) -> dict[str, str]:
    """The defaults `env` (default: this process's environment) does not set itself."""
    env = dict(os.environ) if env is None else env
    return {k: v for k, v in DEFAULTS.items() if k not in env}


def added_by_reexec() -> tuple[str, ...]:
    return tuple(k for k in os.environ.get(ADDED_ENV, "").split(",") if k)


def reexec_with_defaults(module: str) -> None:
    """Re-run `python -m module <same arguments>` with the defaults set, unless they are set already
    (or torch was imported before this process could set them, and this is the re-run)."""
    extra = missing()
    if not extra or ADDED_ENV in os.environ:
        return
    env = {**os.environ, **extra, ADDED_ENV: ",".join(extra)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
