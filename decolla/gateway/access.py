"""The gateway's optional access token: with one set, the pages and the API answer only
requests that present it, as `Authorization: Bearer TOKEN` or as `?token=TOKEN` (how a
browser opens the page, and how the page's event stream presents it: EventSource cannot
set headers). The page's scripts pass the token on to their own calls (static/access.js).

Left open: /static/ (the page's scripts and style, the same in every installation, no
data) and /healthz (says only that the server runs), so that a probe needs no secret.
"""
from __future__ import annotations

import hmac
import json
import os
from urllib.parse import parse_qs

TOKEN_ENV = "DECOLLA_GATEWAY_TOKEN"
OPEN_PATHS = ("/static/", "/healthz")


def resolve_token(given: str | None = None) -> str | None:
    """The token to require: `given`, else DECOLLA_GATEWAY_TOKEN, else None (no token)."""
    return given or os.environ.get(TOKEN_ENV) or None


def presented_token(scope: dict) -> str:
    """The token a request presents: its bearer header, else its `token` query parameter."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("token", [""])[0]


class TokenGate:
    """ASGI middleware: 401 for a request to a guarded path without the right token."""

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("TokenGate needs a non-empty token")
        self.app, self._token = app, token.encode()

    def allows(self, scope: dict) -> bool:
        if scope["type"] == "lifespan":
            return True
        path = scope.get("path", "")
        if path.startswith(OPEN_PATHS):
            return True
        return hmac.compare_digest(presented_token(scope).encode(), self._token)

    async def __call__(self, scope, receive, send):
        if self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        if scope["path"].startswith("/api/"):
            body = json.dumps({"error": "unauthorized", "status": 401,
                               "message": "this gateway needs its access token: send "
                                          "'Authorization: Bearer TOKEN'"}).encode()
            ctype = b"application/json"
        else:
            body = (b"This gateway needs its access token: open the page as "
                    b"http://HOST:PORT/?token=TOKEN\n")
            ctype = b"text/plain; charset=utf-8"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", ctype), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
