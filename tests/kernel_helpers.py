"""What the Triton kernel tests share: the device, tolerances, host-sync traps, the sm_90 compile check.

Without CUDA the kernels run under Triton's interpreter; the variable must be set before the first
`@triton.jit` decoration, so test modules import this file before anything that imports triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REPO_ROOT = Path(__file__).resolve().parents[1]

Tolerances = dict[torch.dtype, tuple[float, float]]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tolerances: Tolerances) -> None:
    atol, rtol = tolerances[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def load_kernels(module_name: str, kernel_name: str) -> ModuleType:
    """Import a Triton kernel module, decorated for the interpreter when there is no GPU."""
    module = importlib.import_module(module_name)
    # If another test module imported it before the interpreter flag was set, the kernels were
    # decorated for a GPU that is not there; re-decorating them is all that is needed.
    if INTERPRETED and type(getattr(module, kernel_name)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


@contextmanager
def no_host_sync(what: str) -> Iterator[None]:
    """Make every Tensor -> Python value conversion raise: on CUDA each would stall the step."""
    names = ["item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name: str) -> Callable[..., Any]:
        def raiser(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host sync: Tensor.{name}() inside {what}")

        return raiser

    for name in names:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextmanager
def cuda_sync_trap() -> Iterator[None]:
    """On a GPU: any operation that synchronizes with the host raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def compile_for_sm90(script: str, expected: str, timeout_s: int) -> None:
    """Run a script that compiles kernels for sm_90 in a fresh interpreter (this one's are interpreted).

    The interpreter accepts code the GPU compiler rejects, so this catches what only a GPU would.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert expected in proc.stdout


# The compile scripts end with this: no ptxas on the machine is a skip (exit 77), anything else fails.
COMPILE_OR_SKIP = r"""
def compile_or_skip(source, target, options):
    try:
        return triton.compile(source, target=target, options=options)
    except Exception as exc:
        if "ptxas" in str(exc) and isinstance(exc, (FileNotFoundError, RuntimeError)):
            print("no ptxas:", exc)
            sys.exit(77)
        raise
"""
