"""Which attention path an engine on the CPU takes: the native paged-attention op, or torch's.

On the CPU the torch path of `engine.attention` gathers each sequence's K/V into a padded batch
before attending, so the cache bytes cross memory three times; the native op
(engine/csrc/paged_attention.cpp, built by `engine.native_ops`) reads each K/V row once, in place,
through the block tables.

LORASERVE_CPU_ATTENTION picks the path: `auto` (default: native on the CPU when it builds, else the
torch path with a logged reason), `native` (must build; an error otherwise), `torch` (the reference).
Other devices always take the torch path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from engine import native_ops

MODE_ENV = "LORASERVE_CPU_ATTENTION"
MODES = ("auto", "native", "torch")

NativeOp = Callable[..., torch.Tensor]


class NativeAttentionUnavailable(RuntimeError):
    """LORASERVE_CPU_ATTENTION=native, and the op cannot be built or loaded here (the message says why)."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {value!r}")
    return value


def native_op() -> NativeOp | None:
    """The native op, or None (reason logged) when the native ops cannot be built here."""
    lib = native_ops.library()
    return None if lib is None else lib.paged_attention


def use_native(device: torch.device | str, loader: native_ops.NativeLoader = native_ops.LOADER) -> bool:
    """Whether attention on `device` runs the native op (LORASERVE_CPU_ATTENTION, the build, the device)."""
    chosen = mode()
    if chosen == "torch" or torch.device(device).type != "cpu":
        return False
    available = loader.library() is not None
    if not available and chosen == "native":
        raise NativeAttentionUnavailable(f"{MODE_ENV}=native but the native op cannot be built: {loader.failure}")
    return available
