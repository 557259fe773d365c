"""The native pointwise ops (engine/csrc/pointwise.cpp) against the torch reference (engine/pointwise.py).

- each op equals the reference to float32 rounding over row counts on both sides of the parallel
  grain (1, 7, 57, 300, 1025), odd widths, and strided inputs (the fused projections' column slices);
- NaN / Inf / huge values propagate like the reference and stay in their own row;
- the model gives the same logits with either (packed and unpacked), and the engine picks the path
  from LORASERVE_CPU_POINTWISE, falling back to the reference when the build fails (a forced native
  path fails loudly) and on other dtypes / devices.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from engine import cpu_pointwise, native_ops
from engine.pointwise import TORCH, Pointwise

NO_COMPILER = not any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(NO_COMPILER, reason="no C++ compiler: the torch path is used")
ROWS = [1, 7, 57, 300, 1025]


@pytest.fixture(scope="module")
def native() -> Pointwise:
    lib = native_ops.library()
    assert lib is not None, f"a C++ compiler is installed, so the native ops must build: {native_ops.LOADER.failure}"
    return cpu_pointwise.NativePointwise(lib)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rope_tables(rows: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(rows).float() * 7 % 2048
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [576, 37])
def test_norms_equal_the_reference(native: Pointwise, rows: int, hidden: int) -> None:
    x, residual, weight = randn(rows, hidden, seed=1), randn(rows, hidden, seed=2), randn(hidden, seed=3)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), TORCH.rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-5)
    got_norm, got_sum = native.add_rms_norm(x, residual, weight, 1e-6)
    want_norm, want_sum = TORCH.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(got_sum, want_sum)  # one float add per element: the same bits
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-5, atol=1e-5)
    # Nothing is changed in place.
    assert torch.equal(x, randn(rows, hidden, seed=1)) and torch.equal(residual, randn(rows, hidden, seed=2))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 24), (8, 2, 128)])
def test_rope_equals_the_reference_on_the_fused_projection(
    native: Pointwise, rows: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    # The fused qkv output, and a column slice of a wider buffer (rows strided).
    width = (heads + 2 * kv_heads) * head_dim
    wide = randn(rows, width + 40, seed=4)
    cos, sin = rope_tables(rows, head_dim)
    for qkv in (wide[:, :width].contiguous(), wide[:, :width]):
        got_q, got_k = native.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
        want_q, want_k = TORCH.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
        assert got_q.shape == (rows, heads, head_dim) and got_k.shape == (rows, kv_heads, head_dim)
        assert got_q.is_contiguous() and got_k.is_contiguous()
        torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [1536, 11])
def test_silu_mul_equals_the_reference(native: Pointwise, rows: int, width: int) -> None:
    # Gate values from -100 to 100: both tails of the sigmoid, and exp's clamped range.
    wide = randn(rows, 2 * width + 5, seed=5, scale=30.0)
    for gate_up in (wide[:, : 2 * width].contiguous(), wide[:, : 2 * width]):
        torch.testing.assert_close(native.silu_mul(gate_up), TORCH.silu_mul(gate_up), rtol=2e-6, atol=1e-6)


def test_special_values_propagate_like_the_reference_and_stay_in_their_row(native: Pointwise) -> None:
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 88.5, -88.5, 0.0])
    gate_up = randn(3, 16, seed=6)
    gate_up[1, :8] = specials
    got, want = native.silu_mul(gate_up), TORCH.silu_mul(gate_up)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=1e-6)
    assert got[[0, 2]].isfinite().all()

    x, weight = randn(3, 8, seed=7), randn(8, seed=8)
    x[1] = specials
    normed, _ = native.add_rms_norm(x, torch.zeros_like(x), weight, 1e-5)
    assert normed[1].isnan().all() and normed[[0, 2]].isfinite().all()
    torch.testing.assert_close(normed[[0, 2]], TORCH.rms_norm(x, weight, 1e-5)[[0, 2]], rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_bad_shapes_are_refused(native: Pointwise) -> None:
    with pytest.raises(RuntimeError, match="float32 only"):
        native.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match=r"x \[T, H\], weight \[H\]"):
        native.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="qkv"):
        native.rope_qk(torch.ones(2, 10), torch.ones(2, 4), torch.ones(2, 4), 2, 1, 4)
    with pytest.raises(RuntimeError, match="gate_up"):
        native.silu_mul(torch.ones(2, 5))


def test_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_pointwise.MODE_ENV, raising=False)
    assert cpu_pointwise.mode() == "auto"
    assert cpu_pointwise.for_device("cpu", torch.float32).backend == "native"
    assert cpu_pointwise.for_device("cpu", torch.bfloat16).backend == "torch"
    assert cpu_pointwise.for_device("meta", torch.float32).backend == "torch"
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, " Torch ")
    assert cpu_pointwise.for_device("cpu", torch.float32).backend == "torch"
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, "fast")
    with pytest.raises(ValueError, match=r"LORASERVE_CPU_POINTWISE must be one of \('auto', 'native', 'torch'\)"):
        cpu_pointwise.mode()


def test_a_failed_build_falls_back_and_a_forced_native_path_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(cflags: tuple[str, ...]) -> native_ops.Library:
        raise RuntimeError("Error building extension:\nfoo.cpp:1:1: error: no compiler here")

    loader = native_ops.NativeLoader(build=failing_build)
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, "auto")
    assert cpu_pointwise.for_device("cpu", torch.float32, loader).backend == "torch"
    monkeypatch.setenv(cpu_pointwise.MODE_ENV, "native")
    with pytest.raises(cpu_pointwise.NativePointwiseUnavailable, match="no compiler here"):
        cpu_pointwise.for_device("cpu", torch.float32, loader)
