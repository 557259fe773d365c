from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TinyFamily, build_family

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyFamily]:
    root: Path = tmp_path_factory.mktemp("tiny")
    return {name: build_family(root, name) for name in ("llama", "mistral", "qwen2")}
