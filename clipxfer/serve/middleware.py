"""The one middleware: the security checks of :mod:`.security` before the app; security headers,
the token cookie and the request metrics after it.

Pure ASGI rather than ``@app.middleware``: that wrapper runs every request through an extra task
and stream, a cost every request pays.
"""

from __future__ import annotations

import time

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .config import ServeConfig
from .security import TOKEN_COOKIE, refusal, security_headers


class GuardMiddleware:
    """Token check and upload cap before the app; security headers, the token cookie and the
    request metrics after it."""

    def __init__(self, app, config: ServeConfig, requests_total, latency):
        self.app, self.config = app, config
        self.requests_total, self.latency = requests_total, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request = Request(scope)
        path = scope["path"]
        token = request.query_params.get("token") if self.config.token and path == "/" else None
        status = [500]

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
                await self.app(scope, receive, send_with_headers)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            self.requests_total.labels(scope["method"], name, str(status[0])).inc()
            self.latency.labels(scope["method"], name).observe(time.perf_counter() - start)
