"""Where an adapter may be read from: the one rule for sources, and reading a file only under its root.

Two checks, both used by the engine's adapter pool and by the ingress (serve_app/admin.py):

- `check_source(source, roots)`: a source that comes from outside (a request naming an adapter
  with dynamic loading on, the admin API) must be a Hub id (`org/name`) or a path that resolves
  (symlinks and `..` followed) to a directory under one of the allowed roots. Only path metadata
  is looked at; no adapter file is opened.
- `read_under(path, root, limit)`: every adapter file is resolved again when it is read (every
  read: first load, reload, a read after the host cache dropped it) and refused unless its real
  location lies under `root`, so a file swapped for a symlink out of the root after registration
  is refused too. On Linux the opened descriptor's own path is checked as well, which closes the
  window between resolving and opening.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    """`org/name` with no path-like parts, and not an existing local path (which would be read as one)."""
    return bool(HUB_ID.match(source)) and ".." not in source and not Path(source).exists()


def is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_source(source: str, roots: Sequence[str | Path]) -> None:
    """Raise PermissionError unless `source` is a Hub id or resolves to a path under one of `roots`."""
    if not source or "\x00" in source:
        raise PermissionError("source is empty or contains a NUL byte")
    if is_hub_id(source):
        return
    path = Path(source)
    if not path.is_absolute():
        raise PermissionError(f"source {source!r} is neither a Hub id (org/name) nor an absolute path")
    resolved = path.resolve()  # follows symlinks and `..`: a link or a climb out of the roots is refused
    allowed = [Path(r).resolve() for r in roots]
    if not any(is_under(resolved, root) for root in allowed):
        shown = ", ".join(str(r) for r in allowed) or "(none configured)"
        raise PermissionError(f"source {source!r} resolves to {str(resolved)!r}, outside the allowed adapter "
                              f"roots: {shown}")


def root_of(source: str, roots: Sequence[str | Path]) -> Path | None:
    """The allowed root (resolved) a local `source` lies under, by its spelling or by where it resolves.

    Both count: a source spelled under a root stays confined to it even if it is later swapped for
    a link out of the root, and one that resolved into a root when it was registered stays
    confined to that root when its link is later re-pointed elsewhere.
    """
    path = Path(source).expanduser()
    spelled, resolved = Path(os.path.abspath(path)), path.resolve()
    for root in roots:
        spelled_root = Path(os.path.abspath(Path(root).expanduser()))
        real_root = spelled_root.resolve()
        if is_under(resolved, real_root) or is_under(spelled, spelled_root) or is_under(spelled, real_root):
            return real_root
    return None


def read_under(path: Path, root: Path | None, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused unless its real location lies under `root`.

    Raises FileNotFoundError (missing, or a dangling link), PermissionError (outside `root`, or not
    a regular file: a FIFO or device would block or never end) or ValueError (larger than `limit`
    bytes). `root=None` reads without confinement (adapters the operator listed).
    """
    real = path.resolve(strict=True)
    if root is not None and not is_under(real, root):
        raise PermissionError(f"{path.name} resolves outside the allowed root (a symlink out of it?)")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: `real` has no links left, so
    # one appearing there now is a swap between resolve() and open().
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise PermissionError(f"{path.name} cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{path.name} is not a regular file")
        opened = Path(f"/proc/self/fd/{fd}")
        if root is not None and opened.is_symlink() and not is_under(Path(os.readlink(opened)), root):
            raise PermissionError(f"{path.name} resolves outside the allowed root (it changed while being opened)")
        if info.st_size > limit:
            raise ValueError(f"{path.name} is {info.st_size} bytes, more than the {limit} bytes allowed")
        chunks: list[bytes] = []
        remaining = limit + 1  # one byte more than allowed tells a file that grew while being read
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            raise ValueError(f"{path.name} is more than the {limit} bytes allowed")
        return b"".join(chunks)
    finally:
        os.close(fd)
