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


class StoreFailure(SkydeckError):
    """The store could not make a write durable (disk full, I/O error, read-only
    file, a lock held past the busy timeout).

    507 Insufficient Storage: the request itself was fine, and nothing of it was
    kept, so the sender may send it again.
    """

    status = 507

    def __init__(self, reason: str) -> None:
        super().__init__(f"the store could not commit: {reason}")
        self.reason = reason


def unwrap(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (Trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
