"""The one middleware: the security checks of :mod:`.security` before the app, the body size
counted as it arrives; security headers, the token cookie and the request metrics after it.

Pure ASGI rather than ``@app.middleware``: that wrapper runs every request through an extra task
and stream, a cost every request pays.
"""

from __future__ import annotations

import time

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from .config import ServeConfig
from .security import TOKEN_COOKIE, body_limit, refusal, security_headers, too_large_detail


class BodyTooLarge(HTTPException):
    """A request body (sent without Content-Length, e.g. chunked) grew past the upload cap."""


def route_label(scope, root_path: str) -> str:
    """The route template a request matched (``/api/items/{item_id}``, ``/docs``, ``/static``),
    for the metrics; ``unmatched`` for paths no route serves, so labels stay few. ``root_path`` is
    the scope's before routing (a mount extends it)."""
    route = scope.get("route")
    if route is None and "app" in scope:
        # FastAPI records only its own routes in the scope: /docs, /openapi.json and the /static
        # mount are matched again here (the middleware's refusals too, which never reach the router).
        original = {"type": "http", "path": scope["path"], "root_path": root_path, "method": scope["method"]}
        route = next((r for r in scope["app"].router.routes if r.matches(original)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class GuardMiddleware:
    """Host, token, Origin, body-type and size checks before the app, the body counted as it
    arrives; security headers, the token cookie and the request metrics after it."""

    def __init__(self, app, config: ServeConfig, requests_total, latency):
        self.app, self.config = app, config
        self.requests_total, self.latency = requests_total, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request = Request(scope)
        path, root_path = scope["path"], scope.get("root_path", "")
        token = request.query_params.get("token") if self.config.token and path == "/" else None
        status = [500]
        limit, received = body_limit(self.config), [0]

        async def receive_within_limit():
            # Counted per message, so a chunked upload stops at the cap instead of being spooled
            # whole by the multipart parser before the route sees its size.
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge(413, too_large_detail(self.config))
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in security_headers(path).items():
                    if key not in headers:
                        headers.append(key, value)
                if token and message["status"] == 200:
                    cookie = Response()
                    cookie.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                    headers.append("set-cookie", cookie.headers["set-cookie"])
            await send(message)

        refused = refusal(request, self.config)
        try:
            if refused is not None:
                refused_status, detail = refused
                await JSONResponse({"detail": detail}, status_code=refused_status)(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive_within_limit, send_with_headers)
        finally:
            name = route_label(scope, root_path)
            self.requests_total.labels(scope["method"], name, str(status[0])).inc()
            self.latency.labels(scope["method"], name).observe(time.perf_counter() - start)
