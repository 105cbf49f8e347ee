"""The errors skydeck raises, as one tree (httpx's ``_exceptions.py`` is the model).

::

    SkydeckError
    ├── InputError          the caller sent something that cannot be taken
    │   ├── BadRequest      a body, field, name or query value (``field`` names it)
    │   ├── CursorError     a paging cursor this store did not hand out
    │   └── InvalidNote     a vault note that is no valid agent or job definition
    ├── StateError          the input was fine; the daemon's state says no
    │   ├── NotFound        no such agent, job, message
    │   ├── Conflict        a name or channel taken
    │   ├── Stale           a turn's messages moved on under it (several hosts)
    │   ├── Unavailable     shutting down
    │   └── FencedOut       a write for a channel this host no longer owns (a newer fence)
    └── ExternalError       something outside the daemon failed
        ├── BackendError    a turn's backend (``session_id``: one it saw echoed)
        ├── DeliveryError   a mirror's write (``status``: the far side's, if any)
        └── StoreFailure    the disk: a write could not be made durable
            └── StoreUnreachable   a shared store did not confirm it (P6)

Domain code raises these and carries no HTTP status: `app.py` maps the tree to
statuses in one table, and the CLI prints any of them as one line. A bug is
not in this tree (`ledger.IllegalMove` is a `RuntimeError`): it is a 500.
"""

from __future__ import annotations


class SkydeckError(Exception):
    """``field`` names the one field at fault, when there is one (input and state errors)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


# -- input --------------------------------------------------------------------------


class InputError(SkydeckError):
    pass


class BadRequest(InputError):
    pass


class CursorError(InputError):
    pass


class InvalidNote(InputError):
    pass


# -- state --------------------------------------------------------------------------


class StateError(SkydeckError):
    pass


class NotFound(StateError):
    pass


class Conflict(StateError):
    pass


class Unavailable(StateError):
    pass


class FencedOut(StateError):
    """A turn's write carried a fence token that is no longer the channel's:
    another holder took the channel over, so this write changed nothing
    (multi-host.md P11). The turn stops without any further side effect."""

    def __init__(self, channel: str, token: int) -> None:
        super().__init__(f"channel {channel!r} is no longer held with fence token {token}")
        self.channel = channel
        self.token = token


class Stale(StateError):
    """A turn's write found its messages moved on (ended, or put back by a
    deregistration on another host): it changed nothing, and the turn is
    skipped; the channel goes on (multi-host.md P11's compare-and-set)."""


# -- external -----------------------------------------------------------------------


class ExternalError(SkydeckError):
    pass


class BackendError(ExternalError):
    """A failed turn. ``session_id`` is set when the backend saw one echoed before failing."""

    def __init__(self, reason: str, *, session_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.session_id = session_id


class DeliveryError(ExternalError):
    """A mirror's write failed; ``status`` is the far side's HTTP status, if it answered."""

    #: False when the writer already waited as long as a turn may (Telegram's
    #: delivery wait, T37): R20 must not wait that long again.
    retry: bool = True

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} ({status})")
        self.status = status

    @property
    def transient(self) -> bool:
        """No status (network error, timeout) or a 5xx may pass; a 4xx will not."""
        return self.status is None or 500 <= self.status <= 599


class StoreFailure(ExternalError):
    """The store could not make a write durable (disk full, I/O error, read-only
    file, a lock held past the busy timeout). The request itself was fine and
    nothing of it was kept, so the sender may send it again.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the store could not commit: {reason}")
        self.reason = reason


class StoreUnreachable(StoreFailure):
    """A shared store (PostgreSQL) did not confirm the write: the connection
    broke or the server did not answer, so the write may or may not have
    landed (multi-host.md P6). A sender that resends with the same ``id`` gets
    the original back as a duplicate (R8)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = f"the store did not confirm the write ({reason}); resend with the same id"
        self.args = (self.message,)


def unwrap(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (Trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
