"""`EngineConfig.attention_backend`: validated by name, resolved once per engine to what runs on the device."""

from __future__ import annotations

import pytest

from engine import cpu_attention
from engine.attention_backend import AttentionBackendUnavailable, resolve
from engine.config import EngineConfig


def test_unknown_backend_is_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"attention_backend must be one of \['auto', 'torch', 'native', 'triton'\]"):
        EngineConfig(model="m", attention_backend="flash").validate()
    with pytest.raises(ValueError, match="enforce_eager must be true or false"):
        EngineConfig(model="m", enforce_eager="yes").validate()  # type: ignore[arg-type]


def test_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    native = cpu_attention.native_op() is not None
    assert resolve("auto", "cpu") == ("native" if native else "torch")
    monkeypatch.setenv(cpu_attention.MODE_ENV, "torch")
    assert resolve("auto", "cpu") == "torch"  # LORASERVE_CPU_ATTENTION still picks the CPU path
    assert resolve("torch", "cuda") == "torch"


def test_explicit_backends_that_cannot_run_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AttentionBackendUnavailable, match="CPU only"):
        resolve("native", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(AttentionBackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", "cpu") == "triton"
