"""The engine's native CPU ops (engine/csrc/*.cpp): compiled once per machine, loaded on first use.

Registered under `torch.ops.loraserve`: `paged_attention` (engine.cpu_attention), `lora_apply`
(engine.cpu_lora), and the layer's pointwise ops `rms_norm`, `add_rms_norm`, `rope_qk`, `silu_mul`
(engine.cpu_pointwise). They are compiled with `torch.utils.cpp_extension` (ninja) and the
machine's own compiler, tuned for this CPU (-march=native; the build directory's name carries the
CPU's identity), the first time an engine needs them, into $TORCH_EXTENSIONS_DIR or else
$XDG_CACHE_HOME/loraserve/torch_extensions (~/.cache/loraserve/torch_extensions), under a file lock
so concurrent processes (replicas, test workers) build once and the others load the result.
`python -m engine.build_native` builds ahead of time. When the build fails (no compiler, say) every
caller falls back to its torch path and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("paged_attention.cpp", "lora.cpp", "pointwise.cpp"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("cephes_exp.h",))  # in the build name's hash
NATIVE_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-march=native")

# What a build returns: the op namespace (`.paged_attention`, `.lora_apply`, `.rms_norm`, ...).
Library = Any
Builder = Callable[[tuple[str, ...]], Library]


def extensions_root() -> Path:
    """$TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/loraserve/torch_extensions (~/.cache/loraserve/...).

    Deliberately not under LORASERVE_CACHE_DIR: that one moves with each model cache (tests point it
    at temporary directories), and the compiled ops should be built once per machine, not per cache.
    """
    env = os.environ.get("TORCH_EXTENSIONS_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loraserve" / "torch_extensions"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags (Linux), else the platform."""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    return f"{platform.machine()} {platform.processor()}"


def build_name(cflags: tuple[str, ...]) -> str:
    """Directory name of one build: changes with the sources, the flags, torch, Python and the CPU."""
    digest = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES + HEADERS), repr(cflags).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_identity().encode()):
        digest.update(part)
    return f"loraserve_native_{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes; released by the OS if the holder dies mid-build."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's own lock file still serialises builds
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(cflags: tuple[str, ...]) -> Library:
    from torch.utils import cpp_extension

    name = build_name(cflags)
    build_dir = extensions_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir.parent / f"{name}.lock"):
        # Under our lock nobody else is building here, so a lock file cpp_extension left behind is
        # from a build that died: without removing it, cpp_extension would wait for it forever.
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name, sources=[str(s) for s in SOURCES], extra_cflags=list(cflags), extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    return torch.ops.loraserve


class NativeLoader:
    """Builds or loads the ops once (per loader), and remembers why it could not."""

    def __init__(self, build: Builder = _build) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._done = False
        self._library: Library | None = None
        self.failure: str | None = None  # why there are no ops (None while untried or built)

    def library(self) -> Library | None:
        """The op namespace (built or loaded on the first call), or None with the reason logged once."""
        with self._lock:
            if not self._done:
                self._library = self._load()
                self._done = True
            return self._library

    def _load(self) -> Library | None:
        reasons = []
        # Without -march=native as a fallback: some compilers or CPUs do not support it.
        for cflags in (NATIVE_CFLAGS, NATIVE_CFLAGS[:-1]):
            try:
                return self._build(cflags)
            except Exception as exc:  # a failed build of any kind means the torch paths
                reasons.append(_first_error(exc))
        self.failure = "; ".join(reasons)
        log.warning("native CPU ops unavailable, using the torch paths: %s", self.failure)
        return None


def _first_error(exc: BaseException) -> str:
    """The compiler's first error when there is one (cpp_extension's message starts with the command)."""
    lines = str(exc).strip().splitlines()
    errors = [ln.strip() for ln in lines if "error:" in ln or "Error:" in ln]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0]}"


LOADER = NativeLoader()


def library() -> Library | None:
    """The process-wide native ops, or None (reason logged) when they cannot be built here."""
    return LOADER.library()
