"""The native CPU paged-attention op (engine/csrc/paged_attention.cpp): built once, loaded on first use.

On the CPU the torch path of `engine.attention` gathers each sequence's K/V into a padded batch
before attending, so the cache bytes cross memory three times; the native op reads each K/V row
once, in place, through the block tables. It is compiled with `torch.utils.cpp_extension` and the
machine's own compiler (tuned for this CPU) the first time an engine needs it, into
$TORCH_EXTENSIONS_DIR or else $XDG_CACHE_HOME/loraserve/torch_extensions (~/.cache/...), under a file
lock so concurrent processes (replicas, test workers) build it once. `python -m engine.cpu_attention`
builds it ahead of time.

LORASERVE_CPU_ATTENTION picks the path: `auto` (default: native on the CPU when it builds, else the
torch path with a logged reason), `native` (must build; an error otherwise), `torch` (the reference).
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

import torch

log = logging.getLogger(__name__)

MODE_ENV = "LORASERVE_CPU_ATTENTION"
MODES = ("auto", "native", "torch")
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# -march=native: the build is for this machine (the build directory's name carries the CPU's identity).
NATIVE_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-march=native")

NativeOp = Callable[..., torch.Tensor]

_lock = threading.Lock()
_loaded: dict[str, NativeOp | None] = {}
_failure: str | None = None


class NativeAttentionUnavailable(RuntimeError):
    """LORASERVE_CPU_ATTENTION=native, and the op cannot be built or loaded here (the message says why)."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {value!r}")
    return value


def extensions_root() -> Path:
    """$TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/loraserve/torch_extensions (~/.cache/loraserve/...).

    Deliberately not under LORASERVE_CACHE_DIR: that one moves with each model cache (tests point it
    at temporary directories), and the compiled op should be built once per machine, not per cache.
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
    """Directory name of one build: changes with the source, the flags, torch, Python and the CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(cflags).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_identity().encode()):
        digest.update(part)
    return f"loraserve_cpu_attention_{digest.hexdigest()[:16]}"


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


def _build(cflags: tuple[str, ...]) -> NativeOp:
    from torch.utils import cpp_extension

    name = build_name(cflags)
    build_dir = extensions_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir.parent / f"{name}.lock"):
        # Under our lock nobody else is building here, so a lock file cpp_extension left behind is
        # from a build that died: without removing it, cpp_extension would wait for it forever.
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=list(cflags), extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    return torch.ops.loraserve.paged_attention


def native_op() -> NativeOp | None:
    """The native op (built or loaded on the first call), or None with the reason logged once."""
    global _failure
    with _lock:
        if "op" in _loaded:
            return _loaded["op"]
        op: NativeOp | None = None
        reasons = []
        # Without -march=native as a fallback: some compilers or CPUs do not support it.
        for cflags in (NATIVE_CFLAGS, NATIVE_CFLAGS[:-1]):
            try:
                op = _build(cflags)
                break
            except Exception as exc:  # a failed build of any kind means the torch path
                reasons.append(_first_line(exc))
        if op is None:
            _failure = "; ".join(reasons)
            log.warning("native CPU paged attention unavailable, using the torch path: %s", _failure)
        _loaded["op"] = op
        return op


def _first_line(exc: BaseException) -> str:
    """The compiler's first error when there is one (cpp_extension's message starts with the command)."""
    lines = str(exc).strip().splitlines()
    errors = [ln.strip() for ln in lines if "error:" in ln or "Error:" in ln]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0]}"


def use_native(device: torch.device | str) -> bool:
    """Whether attention on `device` runs the native op (LORASERVE_CPU_ATTENTION, the build, the device)."""
    chosen = mode()
    if chosen == "torch" or torch.device(device).type != "cpu":
        return False
    op = native_op()
    if op is None and chosen == "native":
        raise NativeAttentionUnavailable(f"{MODE_ENV}=native but the native op cannot be built: {_failure}")
    return op is not None


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    op = native_op()
    if op is None:
        raise SystemExit(f"native CPU paged attention could not be built: {_failure}")
    print(f"native CPU paged attention ready under {extensions_root()}")


if __name__ == "__main__":
    main()
