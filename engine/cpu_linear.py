"""Float32 linear layers on the CPU through oneDNN, with each weight packed once at engine start.

Why: for float32 `F.linear` calls MKL's sgemm, and MKL picks its generic code path on CPUs that are
not Intel's (MKL_VERBOSE reports "Intel(R) Architecture processors" on this project's AMD EPYC
machines, which have AVX-512), while oneDNN generates code for the CPU it finds. With the weight
packed ahead of time into oneDNN's blocked layout no call reorders it either. On the SmolLM2 shapes
(30 layers, weights streamed from memory) this ran 1.9-2.4x faster than `F.linear` for 1-1024 rows.

The ops used are the ones torch.compile's CPU freezing pass emits (`torch.ops.mkldnn`); where they
are missing, fail, or disagree with `F.linear` on a probe, the torch path stays, with the reason
logged. LORASERVE_CPU_LINEAR: `auto` (default: oneDNN for float32 on the CPU when it works),
`onednn` (must work: an error otherwise), `torch` (plain `F.linear`).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODE_ENV = "LORASERVE_CPU_LINEAR"
MODES = ("auto", "onednn", "torch")
# oneDNN picks its packed layout for a batch-size hint; any row count works with it. 1024 (a full
# prefill chunk) measured as fast as smaller hints for decode batches and faster for prefill.
PACK_ROWS_HINT = 1024


class OneDnnLinearUnavailable(RuntimeError):
    """LORASERVE_CPU_LINEAR=onednn, and oneDNN linear does not work here (the message says why)."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {value!r}")
    return value


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 weight -> oneDNN's packed copy (an opaque tensor only `linear` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a weight packed by `pack`; x [..., in]."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _probe() -> str | None:
    """None when packed oneDNN linear works and matches F.linear here, else the reason it cannot be used."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 40, generator=gen)
        bias = torch.randn(48, generator=gen)
        x = torch.randn(5, 40, generator=gen)
        got = linear(x, pack(weight), bias)
    except Exception as exc:  # a missing or failing op of any kind means the torch path
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    want = F.linear(x.double(), weight.double(), bias.double())
    if got.shape != want.shape or not torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4):
        return "oneDNN linear disagrees with F.linear on a probe"
    return None


def use_onednn(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether float32 linears on `device` run through packed oneDNN (LORASERVE_CPU_LINEAR, a probe)."""
    chosen = mode()
    if chosen == "torch" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    reason = _probe()
    if reason is None:
        return True
    if chosen == "onednn":
        raise OneDnnLinearUnavailable(f"{MODE_ENV}=onednn but oneDNN linear cannot be used: {reason}")
    log.warning("oneDNN linear unavailable, using F.linear: %s", reason)
    return False
