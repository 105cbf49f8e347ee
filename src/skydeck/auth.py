"""Who may call the API.

No token configured: the daemon binds loopback only (enforced at start) and
everything is open. With a token, every ``/api/*`` route needs
``Authorization: Bearer <token>``; the comparison is constant-time and every
failure looks the same, so a caller learns nothing about why.
"""

from __future__ import annotations

import hmac


class Unauthorized(Exception):
    """Always rendered as the same ``401 {"ok": false, "error": "unauthorized"}``."""


class TokenAuth:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), self._token
        ):
            raise Unauthorized()
