"""Resolve a model or adapter reference to a local directory: a path, or a Hub id via snapshot_download."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_repo_dir(repo_id: str, cache_dir: str | None = None) -> Path:
    """Where huggingface_hub keeps a model repo's cache (snapshots/ links into blobs/), symlinks resolved.

    Every file snapshot_download hands back for `repo_id` lies under it once resolved; an adapter
    read from the Hub is confined to it (engine/adapter_source.py).
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    return (cache / repo_folder_name(repo_id=repo_id, repo_type="model")).resolve()


def resolve_local_dir(
    ref: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local directory for `ref`.

    An existing directory is used as is. Anything else is a Hub repo id fetched (or, with
    HF_HUB_OFFLINE=1, found in the local Hub cache) through huggingface_hub.snapshot_download.
    Raises FileNotFoundError with the reason when neither works.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref.startswith(("/", "./", "../", "~")) or os.sep + os.sep in ref:
        raise FileNotFoundError(f"{ref!r} is not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id=ref,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=allow_patterns or MODEL_FILE_PATTERNS,
            local_files_only=hub_offline(),
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        where = "the local Hub cache (HF_HUB_OFFLINE=1)" if hub_offline() else "the Hub"
        raise FileNotFoundError(f"{ref!r} is neither a local directory nor found on {where}: {exc}") from exc
    return Path(local)
