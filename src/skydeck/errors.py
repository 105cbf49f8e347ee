"""Errors a caller can act on, each carrying its HTTP status.

The service layer raises these; the HTTP app turns them into
``{"ok": false, "error": ..., "field": ...}`` and the CLI prints them as one line.
"""

from __future__ import annotations


class SkydeckError(Exception):
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(SkydeckError):
    status = 400


class NotFound(SkydeckError):
    status = 404


class Conflict(SkydeckError):
    status = 409


class Unavailable(SkydeckError):
    status = 503
