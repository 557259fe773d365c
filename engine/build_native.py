"""Build (or check) the native CPU ops ahead of time, so no engine waits for the compiler at start-up.

    python -m engine.build_native

Builds into engine.native_ops.extensions_root() (TORCH_EXTENSIONS_DIR, else ~/.cache/loraserve/...);
exits non-zero with the compiler's first error when the build fails.
"""

from __future__ import annotations

import logging

from engine import native_ops


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    if native_ops.library() is None:
        raise SystemExit(f"the native CPU ops could not be built: {native_ops.LOADER.failure}")
    print(f"native CPU ops ready under {native_ops.extensions_root()}")


if __name__ == "__main__":
    main()
