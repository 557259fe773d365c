"""ASGI middleware counting the ingress's HTTP responses by route and status code.

The counts back `loraserve_http_requests_total` (serve_app/metrics_exposition.py). Label values stay bounded:
a path that is not one of the app's routes counts as "other", and every admin route that names an
adapter (`/adapters/{id}`, `/adapters/{id}/reload`) as one route.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.http_guards import route_path


class HttpCounter:
    def __init__(self, app: ASGIApp, counts: dict[tuple[str, str], int], routes: Iterable[str]) -> None:
        self.app = app
        self.counts = counts
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        route = path if path in self.routes else "other"
        if path.startswith("/adapters/"):
            route = "/adapters/{id}"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (route, str(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)
