"""API keys: every route needs `Authorization: Bearer KEY`, bar the few listed as public.

Deny by default: the check wraps the whole app, in front of the router, so a route added later
is guarded without anyone remembering to guard it, and an unknown path answers 401, not 404 (a
caller without the key learns nothing about the routes). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .protocol import APIError

PUBLIC_PATHS = frozenset({"/health"})  # load balancers and orchestrators probe it without a key


def key_matches(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `key` as a bearer token (constant time in the token)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class RequireKey:
    """ASGI middleware: a 401 in OpenAI's shape for any request outside PUBLIC_PATHS without the key."""

    def __init__(self, app, key: str, public: frozenset[str] = PUBLIC_PATHS):
        self.app, self.key, self.public = app, key, public

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        if key_matches(Headers(scope=scope).get("authorization"), self.key):
            return await self.app(scope, receive, send)
        present = "authorization" in Headers(scope=scope)
        message = "incorrect API key provided" if present else "this server needs an API key: send Authorization: Bearer KEY"
        error = APIError(401, message, code="invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
