from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter here; this must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from serve_app.__main__ import SERVE_THROUGHPUT_ENV
from tests.helpers import TinyFamily, build_family

# The Serve end-to-end tests run Serve the way the README serves it (throughput-optimized); this
# must precede the first `import ray.serve` of this process and the Ray processes it starts.
os.environ.setdefault(SERVE_THROUGHPUT_ENV, "1")

torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One rule for every `gpu` test: it runs where CUDA is, and is skipped (not failed) elsewhere.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyFamily]:
    root: Path = tmp_path_factory.mktemp("tiny")
    return {name: build_family(root, name) for name in ("llama", "mistral", "qwen2")}
