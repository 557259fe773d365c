"""serve_app/ uses the engine only through its public surface (`engine.__all__`, DESIGN.md principle 6).

An AST check over every serve_app module: no `engine.<submodule>` import, no name `engine/__init__.py`
does not export, no `_private` attribute of an engine object, and no reaching into the Engine's
parts (its scheduler, adapter pool, model runner, ...) whose state the Engine owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import engine

SERVE_APP = Path(__file__).resolve().parent.parent / "serve_app"
# The Engine's parts: their state is the Engine's (read under its lock), so serve_app asks the Engine.
ENGINE_PARTS = frozenset({"pool", "scheduler", "runner", "blocks", "kv", "model", "grammars", "counters",
                          "output_processor", "slots", "records", "queues", "engine_core"})


def _chain(node: ast.AST) -> list[str]:
    """The names along an attribute chain, outermost last: `self.core.engine.pool` -> [self, core, engine, pool]."""
    names: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            names.append(node.id)
            return names[::-1]
        else:
            return names[::-1]


def _is_engine_object(names: list[str]) -> bool:
    return any(n == "engine" or n.endswith("_engine") for n in names)


def violations(source: str, exported: frozenset[str]) -> list[str]:
    """What `source` (a serve_app module) does outside the engine's public surface, one line each."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("engine."):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "engine":
                found += [(node.lineno, f"engine.{a.name} is not exported") for a in node.names
                          if a.name not in exported]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("engine.")]
        elif isinstance(node, ast.Attribute):
            names = _chain(node)
            owner = names[:-1]
            if not _is_engine_object(owner):
                continue
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append((node.lineno, f"private {'.'.join(names)}"))
            elif node.attr in ENGINE_PARTS and owner and _is_engine_object(owner[-1:]):
                found.append((node.lineno, f"engine part {'.'.join(names)}"))
            elif names[0] == "engine" and len(names) == 2 and node.attr not in exported and _imports_engine(source):
                found.append((node.lineno, f"engine.{node.attr} is not exported"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            args = node.args
            if (len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)
                    and _is_engine_object(_chain(args[0]))
                    and (args[1].value.startswith("_") or args[1].value in ENGINE_PARTS)):
                found.append((node.lineno, f"{node.func.id}(..., {args[1].value!r})"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def _imports_engine(source: str) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "engine" for a in n.names) for n in ast.walk(ast.parse(source)))


EXPORTED = frozenset(engine.__all__)


def test_all_names_exist() -> None:
    assert [name for name in engine.__all__ if not hasattr(engine, name)] == []


@pytest.mark.parametrize("path", sorted(SERVE_APP.glob("*.py")), ids=lambda p: p.name)
def test_serve_app_uses_only_the_public_surface(path: Path) -> None:
    assert violations(path.read_text(), EXPORTED) == []


def test_the_check_finds_each_kind_of_leak() -> None:
    source = """
from engine.config import AdapterSpec
from engine import Engine, Scheduler
import engine.errors

def f(engine, core):
    engine._dead
    core.engine._thread.is_alive()
    core.engine.scheduler.queues
    with getattr(core.engine.pool, "_lock"):
        pass
    engine.stats().adapters.source_loads
    engine.is_alive()
"""
    found = violations(source, EXPORTED)
    assert [line.split(":")[0] for line in found] == [
        "line 2", "line 3", "line 4", "line 7", "line 8", "line 9", "line 10", "line 10",
    ], found
    assert "Scheduler is not exported" in found[1]


WIRE_KEYS = [  # snapshot["engine"]: what /metrics and /admin/stats are made of, in this order
    "running", "waiting", "num_running", "num_waiting", "kv_blocks_total", "kv_blocks_used", "kv_blocks_free",
    "prefix_cache", "adapter_slots", "adapter_slots_pinned", "steps", "last_batch_seqs", "last_batch_tokens",
    "max_batch_seqs", "batch_seqs_hist", "prefill_tokens", "decode_tokens", "preemptions", "finished", "aborted",
    "failed", "rejected", "queue_timeouts", "request_timeouts", "scheduling_policy", "prefill_first_steps",
    "fairness", "nonfinite_by_adapter", "grammars", "adapters",
]
POOL_WIRE_KEYS = [
    "adapters_registered", "adapters_host", "adapters_device", "adapters_loading", "host_bytes", "host_cache_bytes",
    "device_slot_bytes", "device_adapter_bytes", "device_hits", "device_misses", "host_hits", "host_misses",
    "source_loads", "load_failures", "host_evictions", "device_evictions",
]


def test_engine_stats_wire_form_keeps_its_keys_and_leaves_out_replica_local_fields() -> None:
    pool = engine.AdapterPoolStats(*range(len(POOL_WIRE_KEYS)), device_adapters=("a", "b"), load_seconds=(0.5,))
    values = {key: 7 for key in WIRE_KEYS}
    values.update(running={"": 1, "a": 2}, batch_seqs_hist={3: 4}, fairness={"a": {"weight": 1.0}}, adapters=pool)
    stats = engine.EngineStats(**values, oldest_waiting_age_s=2.5)
    wire = stats.as_dict()
    assert list(wire) == WIRE_KEYS
    assert wire["adapters"] == dict(zip(POOL_WIRE_KEYS, range(len(POOL_WIRE_KEYS))))
    assert wire["running"] == {"": 1, "a": 2} and wire["batch_seqs_hist"] == {3: 4}
    assert wire["fairness"] == {"a": {"weight": 1.0}}
    assert (stats.load, stats.oldest_waiting_age_s, pool.device_adapters, pool.load_seconds) == (14, 2.5, ("a", "b"), (0.5,))
    with pytest.raises(AttributeError):
        stats.steps = 8  # type: ignore[misc]
