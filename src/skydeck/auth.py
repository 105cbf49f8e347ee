"""Who may call the API, and with which scopes.

- No token and no JWT secret configured: the daemon binds loopback only
  (enforced at start) and everything is open.
- ``SKYDECK_TOKEN``: ``Authorization: Bearer <token>``, compared in constant
  time; a static token holds every scope.
- ``SKYDECK_JWT_SECRET``: HS256 JWTs are accepted too; the space-separated
  ``scope`` claim must hold the route's scope; ``exp``, when present, is
  honoured (pyjwt checks it).

Every failure looks the same (``401 {"ok": false, "error": "unauthorized"}``),
so a caller learns nothing about which part failed; a valid credential that
lacks the route's scope is a 403. Tokens are never logged.
"""

from __future__ import annotations

import hmac
from typing import Literal

import jwt

Scope = Literal["agent:read", "agent:send", "agent:write", "agent:admin"]
ALL_SCOPES: frozenset[str] = frozenset({"agent:read", "agent:send", "agent:write", "agent:admin"})


class Unauthorized(Exception):
    """Always rendered as the same ``401 {"ok": false, "error": "unauthorized"}``."""


class Forbidden(Exception):
    """A valid credential without the scope this route needs."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this token lacks the {scope} scope")
        self.scope = scope


def scope_for(method: str, path: str) -> Scope:
    """The scope a route needs (http-api.md, Auth)."""
    if path.endswith("/reset"):
        return "agent:admin"
    if path.startswith(("/api/agents", "/api/jobs")):
        if method in ("GET", "HEAD"):
            return "agent:read"
        if path.startswith("/api/jobs/") and path.endswith("/run"):
            return "agent:send"
        return "agent:write"
    if method in ("GET", "HEAD"):
        return "agent:read"
    return "agent:send"


class Auth:
    def __init__(self, token: str | None = None, jwt_secret: str | None = None) -> None:
        self._token = token.encode() if token else None
        self._jwt_secret = jwt_secret or None

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._jwt_secret is not None

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise `Unauthorized` or `Forbidden`, or return when the call may go on."""
        if not self.enabled:
            return
        scheme, _, credential = (authorization or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized()
        if self._token is not None and hmac.compare_digest(credential.encode(), self._token):
            return
        if self._jwt_secret is None:
            raise Unauthorized()
        try:
            claims = jwt.decode(
                credential,
                self._jwt_secret,
                algorithms=["HS256"],
            )
        except jwt.PyJWTError:
            raise Unauthorized() from None
        scopes = claims.get("scope")
        granted = set(scopes.split()) if isinstance(scopes, str) else set()
        if scope not in granted:
            raise Forbidden(scope)
