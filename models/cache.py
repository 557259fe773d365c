"""The one cache root of every model this project builds or converts, and the one lock that guards a build.

Built models (the demo model, the converted SmolLM2) live under one directory:
`$LORASERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/loraserve`, else `~/.cache/loraserve`. Builders write
into a temporary sibling and rename it into place; `file_lock` makes concurrent builders (several
Serve replicas starting together, `serve run` twice) wait for the first instead of building twice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "LORASERVE_CACHE_DIR"


def cache_root() -> Path:
    """`$LORASERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/loraserve`, else `~/.cache/loraserve`."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loraserve"


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory inter-process lock (flock) on `lock_path`, created with its parents if missing.

    Where fcntl does not exist (not POSIX) it locks nothing: the builders' atomic rename alone then
    keeps readers from seeing a half-written model, and at worst two processes build the same thing.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
