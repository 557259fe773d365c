"""The adapter admin API: list, load, reload and unload adapters on every model replica.

    GET    /adapters               every adapter of every replica (id, source, rank, targets, bytes,
                                   tier disk/host/device, requests served, last used, replica, the
                                   base_model_name_or_path it names and base_model_mismatch: true
                                   when that is not the served base; it is served all the same)
    POST   /adapters               {"id", "source", "revision", "preload"}: load, or reload when the id exists
    DELETE /adapters/{id}          unload; 409 while requests use it (we refuse, we do not drain)
    POST   /adapters/{id}/reload   re-read an adapter whose files changed

Guarded, because these routes make the server read files and download from the Hub:
- off unless `admin_enabled` (403 "admin API disabled" otherwise: the route exists, it is switched off);
- when on, `Authorization: Bearer <token>` with the token from `admin_token` or
  `LORASERVE_ADMIN_TOKEN`; enabled without a token fails at build time (`resolve_admin_token`);
- a source given over HTTP must be a Hub id or a directory under `adapter_source_roots` after
  resolving symlinks and `..`. The check runs here, on the ingress, before any replica is called,
  so a refused request reads nothing; each replica checks again with its pool's `check_source`
  (its roots are authoritative, and the ingress may run on another node). Both use the one rule,
  engine.check_source (engine/adapter_source.py); the replica also confines every later read of
  the adapter's files to the root its source lies under.

Each replica answers for itself (errors as data, as in serve_app/errors.py); the ingress merges:
404 when no replica knows the id, 409 when any refused because the adapter is busy.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import check_source
from serve_app.errors import admin_status
from serve_app.validation import is_adapter_id

log = logging.getLogger("serve_app.admin")

TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"
MAX_ADMIN_BODY = 64 * 1024

class AdminBackend(Protocol):
    async def admin(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Run `op` on every model replica: one {"replica", "result" | "error"} dict each."""
        ...


@dataclass(frozen=True)
class AdminConfig:
    """What the ingress needs to guard the admin routes (picklable: it is a Serve bind argument)."""

    enabled: bool = False
    token: str | None = None
    source_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.enabled and not self.token:
            raise ValueError(f"admin_enabled is true but no admin token is configured: set admin_token in the "
                             f"app args or the {TOKEN_ENV} environment variable")


def resolve_admin_token(enabled: bool, token: str | None, env: Mapping[str, str]) -> str | None:
    """The configured token (config first, then the environment). Enabled without one is a start-up error."""
    token = token or env.get(TOKEN_ENV) or None
    if enabled and not token:
        raise ValueError(f"admin_enabled is true but no admin token is configured: set admin_token in the app "
                         f"args or the {TOKEN_ENV} environment variable (refusing to serve an open admin API)")
    return token


def admin_error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """TGI's error shape ({"error", "error_type"}), as every other route answers."""
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


class AdminApi:
    def __init__(self, backend: AdminBackend, config: AdminConfig) -> None:
        self.backend = backend
        self.config = config
        self._token = (config.token or "").encode()

    # ---- guard --------------------------------------------------------------------------------
    def refuse(self, request: Request) -> Response | None:
        """The 403/401 answer for a request that may not use the admin API, or None when it may (also
        guards GET /admin/stats, serve_app/http_app.py)."""
        if not self.config.enabled:
            return admin_error(403, "admin API disabled (set admin_enabled: true and an admin token in the "
                                    "app config)", "forbidden")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="loraserve-admin"'}
        if not header:
            return admin_error(401, "missing Authorization header; expected 'Bearer <admin token>'",
                               "unauthorized", challenge)
        if scheme.lower() != "bearer" or not given.strip():
            return admin_error(401, "Authorization must be 'Bearer <admin token>'", "unauthorized", challenge)
        # Constant-time: the comparison's duration must not tell how many leading bytes matched.
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return admin_error(401, "invalid admin token", "unauthorized", challenge)
        return None

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if len(raw) > MAX_ADMIN_BODY:
            return admin_error(413, f"request body too large ({len(raw)} bytes; limit {MAX_ADMIN_BODY})", "validation")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return admin_error(422, f"request body is not valid JSON: {exc}", "validation")
        if not isinstance(body, dict):
            return admin_error(422, "request body must be a JSON object", "validation")
        return body

    async def _run(self, op: str, payload: dict[str, Any]) -> list[dict[str, Any]] | Response:
        try:
            return await self.backend.admin(op, payload)
        except Exception as exc:  # no replica reachable; the backend's message is already plain
            log.warning("admin %s: model replicas unavailable: %r", op, exc)
            return admin_error(503, f"model replicas unavailable: {exc}", "unhealthy")

    @staticmethod
    def _merge(adapter_id: str, results: list[dict[str, Any]], ok_status: int = 200) -> Response:
        """One answer from per-replica results: busy anywhere -> 409; unknown everywhere -> 404;
        another failure -> its status; else ok. The body always lists every replica's outcome."""
        errors = [r["error"] for r in results if "error" in r]
        body: dict[str, Any] = {"id": adapter_id, "replicas": results}
        if not results:
            return admin_error(503, "no model replica answered", "unhealthy")
        kinds = [e.get("kind", "error") for e in errors]
        if "busy" in kinds:
            msg = next(e["message"] for e in errors if e.get("kind") == "busy")
            return JSONResponse({"error": f"refused: in use ({msg}); retry when its requests have finished",
                                 "error_type": "adapter_busy", **body}, status_code=409)
        if errors and all(k == "unknown" for k in kinds) and len(errors) == len(results):
            return JSONResponse({"error": f"unknown adapter {adapter_id!r}", "error_type": "not_found", **body},
                                status_code=404)
        real = [e for e in errors if e.get("kind") != "unknown"]
        if real:
            status, error_type = admin_status(real[0].get("kind", "error"))
            return JSONResponse({"error": real[0]["message"], "error_type": error_type, **body}, status_code=status)
        return JSONResponse(body, status_code=ok_status)

    # ---- routes -------------------------------------------------------------------------------
    async def list_adapters(self, request: Request) -> Response:
        if (refused := self.refuse(request)) is not None:
            return refused
        results = await self._run("list", {})
        if isinstance(results, Response):
            return results
        adapters = [{**a, "replica": r["replica"]} for r in results for a in r.get("result", {}).get("adapters", [])]
        errors = [{"replica": r["replica"], **r["error"]} for r in results if "error" in r]
        return JSONResponse({"adapters": adapters, "replicas": [r["replica"] for r in results], "errors": errors})

    async def load(self, request: Request) -> Response:
        if (refused := self.refuse(request)) is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        adapter_id = body.get("id", body.get("adapter_id"))
        if not isinstance(adapter_id, str) or not is_adapter_id(adapter_id):
            return admin_error(422, "id: required, 1 to 256 printable characters without whitespace",
                               "validation")
        source = body.get("source", adapter_id)  # a bare Hub id: {"id": "org/name"}
        revision = body.get("revision")
        preload = body.get("preload", True)
        if not isinstance(source, str) or (revision is not None and not isinstance(revision, str)) \
                or not isinstance(preload, bool):
            return admin_error(422, "source and revision must be strings, preload a boolean", "validation")
        try:
            check_source(source, self.config.source_roots)
        except PermissionError as exc:
            return admin_error(403, f"source refused: {exc}", "forbidden")
        return await self._run_merged("load", {"id": adapter_id, "source": source, "revision": revision,
                                               "preload": preload})

    async def unload(self, request: Request) -> Response:
        if (refused := self.refuse(request)) is not None:
            return refused
        return await self._run_merged("unload", {"id": request.path_params["adapter_id"]})

    async def reload(self, request: Request) -> Response:
        if (refused := self.refuse(request)) is not None:
            return refused
        return await self._run_merged("reload", {"id": request.path_params["adapter_id"]})

    async def _run_merged(self, op: str, payload: dict[str, Any]) -> Response:
        """`op` on one adapter on every replica, answered as one (see `_merge`)."""
        results = await self._run(op, payload)
        if isinstance(results, Response):
            return results
        return self._merge(payload["id"], results)


def admin_routes(backend: AdminBackend, config: AdminConfig | None) -> list[Route]:
    """The admin routes. Always mounted: switched off they answer 403 with the reason, not a bare 404."""
    api = AdminApi(backend, config or AdminConfig())
    return [
        Route("/adapters", api.list_adapters, methods=["GET"]),
        Route("/adapters", api.load, methods=["POST"]),
        # `:path` so that ids with slashes (Hub ids "org/name") can be named in the URL.
        Route("/adapters/{adapter_id:path}/reload", api.reload, methods=["POST"]),
        Route("/adapters/{adapter_id:path}", api.unload, methods=["DELETE"]),
    ]
