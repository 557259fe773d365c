"""Which attention path an engine takes: `EngineConfig.attention_backend` (config.ATTENTION_BACKENDS), resolved
once per engine.

- "auto": on CUDA the Triton paged kernels (the torch path if Triton does not import); on the CPU what
  LORASERVE_CPU_ATTENTION picks (`engine.cpu_attention`: the native op when it builds, else torch).
- "triton": the Triton kernels everywhere; on the CPU only under Triton's interpreter (TRITON_INTERPRET=1,
  set before Triton is first imported): slow, for tests of the GPU path on a machine without one.
- "native": the native CPU op; an error if it cannot be built or the device is not the CPU.
- "torch": the gather + SDPA reference of `engine.attention`, on any device.
"""

from __future__ import annotations

import os

import torch

from engine import cpu_attention


class AttentionBackendUnavailable(RuntimeError):
    """The configured attention backend cannot run here (the message says why and what to set)."""


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(requested: str, device: torch.device | str) -> str:
    """The backend an engine on `device` uses for `requested` (one of ATTENTION_BACKENDS, as validated
    by EngineConfig)."""
    kind = torch.device(device).type
    if requested == "torch":
        return "torch"
    if requested == "native":
        if kind != "cpu":
            raise AttentionBackendUnavailable(f"attention_backend='native' runs on the CPU only, not on {kind}")
        if cpu_attention.native_op() is None:
            raise AttentionBackendUnavailable("attention_backend='native' but the native op cannot be built here")
        return "native"
    if requested == "triton":
        if not _triton_imports():
            raise AttentionBackendUnavailable("attention_backend='triton' but triton is not installed")
        if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise AttentionBackendUnavailable(
                "attention_backend='triton' on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
        return "triton"
    if kind == "cuda":
        return "triton" if _triton_imports() else "torch"
    return "native" if cpu_attention.use_native(device) else "torch"
