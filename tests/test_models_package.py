"""The `models` package owns the bundled models and the code that makes them; `engine/` is the engine only.

Checks the layering (no module of `engine/` imports `models`, `serve_app` or ray), the one cache root
and its environment overrides, the one build lock, and the command lines the README documents:
`python -m models.demo` (the demo model and all its adapters in one mixed batch) and `python -m engine`
(an engine-only CLI that needs a model).
"""

from __future__ import annotations

import ast
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.cache import CACHE_ENV, cache_root, file_lock
from models.demo import DEMO_ADAPTERS, build_demo
from models.gguf_convert import MODEL_NAME, default_model_dir

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = {"models", "serve_app", "ray", "loadtests", "tests"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_engine_imports_no_model_setup_serve_or_ray_code() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_top_modules(path) & FORBIDDEN_IN_ENGINE)
        for path in sorted((REPO / "engine").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cache_root_env_override_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "loraserve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "loraserve"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "override"))
    assert cache_root() == tmp_path / "override"
    monkeypatch.setenv(CACHE_ENV, "  ")  # blank counts as unset
    assert cache_root() == tmp_path / "xdg" / "loraserve"


def test_converted_and_built_models_share_the_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_model_dir() == tmp_path / MODEL_NAME
    demo = build_demo()
    assert demo.parent == tmp_path and (demo / "base" / "model.safetensors").is_file()


def test_file_lock_is_exclusive_and_creates_its_directory(tmp_path: Path) -> None:
    lock_path = tmp_path / "not" / "yet" / ".model.lock"

    def try_lock() -> bool:
        with lock_path.open("a") as other:  # a second open file description: flock conflicts with the holder
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
            return True

    with file_lock(lock_path):
        assert lock_path.is_file()
        assert try_lock() is False
    assert try_lock() is True


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("LORA_ADAPTERS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_models_demo_cli_runs_every_demo_adapter_in_one_batch(tmp_path: Path) -> None:
    build_demo(tmp_path)
    done = _run(["-m", "models.demo", "--prompt", "hello", "--max-new-tokens", "4"], {CACHE_ENV: str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    served = [line[1:line.index("]")] for line in lines]
    assert served == ["base", *(a[0] for a in DEMO_ADAPTERS)]
    assert len({line.split("->", 1)[1] for line in lines}) > 1  # the adapters change the output


def test_engine_cli_needs_a_model_and_points_at_the_demo(tmp_path: Path) -> None:
    done = _run(["-m", "engine"], {CACHE_ENV: str(tmp_path)})
    assert done.returncode == 2
    assert "--model" in done.stderr
    assert list(tmp_path.iterdir()) == []  # the engine CLI builds nothing
    helped = _run(["-m", "engine", "--help"], {CACHE_ENV: str(tmp_path)})
    assert helped.returncode == 0 and "python -m models.demo" in helped.stdout
