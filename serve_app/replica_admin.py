"""The replica side of the adapter admin API (serve_app/admin.py): one operation on one replica's Engine.

Each replica answers for itself, with errors as data ({"replica", "error": {kind, message}}, the
kinds of serve_app/errors.py `admin_kind`); the ingress merges the answers of all replicas.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine import AdapterSpec, Engine, EngineProcess, InvalidRequestError
from serve_app.errors import admin_kind


async def run_admin_op(engine: Engine | EngineProcess, replica_id: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`op` (list, load, reload, unload) on `engine`: {"replica", "result"} or {"replica", "error"}.

    Loads read files (or download from the Hub): they run in a worker thread so that the replica's
    event loop keeps streaming tokens meanwhile.
    """
    try:
        if op == "list":
            result = {"adapters": engine.adapter_info()}
        else:
            result = await asyncio.to_thread(_admin_op, engine, op, payload)
    except Exception as exc:
        return {"replica": replica_id, "error": {"kind": admin_kind(exc), "message": str(exc)}}
    return {"replica": replica_id, "result": result}


def _admin_op(engine: Engine | EngineProcess, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    adapter_id = str(payload["id"])
    if op == "load":
        source = str(payload.get("source") or adapter_id)
        # Again here, with this replica's own roots (the ingress checked first): nothing is read
        # unless the source is a Hub id or resolves under a configured root.
        engine.check_adapter_source(source)
        revision = payload.get("revision")
        spec = AdapterSpec(adapter_id, source, str(revision) if revision else None)
        return engine.load_adapter(spec, preload=bool(payload.get("preload", True)))
    if op == "reload":
        return engine.reload_adapter(adapter_id)
    if op == "unload":
        engine.unload_adapter(adapter_id)
        return {"id": adapter_id, "unloaded": True}
    raise InvalidRequestError("op", f"unknown admin operation {op!r}")
