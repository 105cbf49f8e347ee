"""The one owner of a message's life: its states, and the moves between them.

Every state a message, a thread record or a channel can be in is spelled here
and nowhere else (a test fails on a state literal outside this module). Every
change of state is a move checked against the table below, so a bug that would
take a `done` message back to `queued` raises `IllegalMove` instead of
silently re-running a turn; moves return new records and never mutate the
records they are given.

Message states (behavior.md, "Message states")::

    buffered ──> queued ──> working ──> done | failed | cancelled
       │  ^        │ └────────────────────────────────> cancelled (stopped before it started)
       │  │        │          │ ^
       │  └────────┘          └─┘ (a restart re-runs a working message, R28;
       v  (deregister, R26)        a mirrored turn stays working until delivered)
    dropped (over the cap, R7)          failed ──> done (a late delivery, R21)

`duplicate` is only ever an answer, never a stored state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Message, ThreadRecord


class MessageState(StrEnum):
    BUFFERED = "buffered"
    QUEUED = "queued"
    WORKING = "working"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"


class ThreadStatus(StrEnum):
    WORKING = "working"
    OK = "ok"
    ERROR = "error"


class AgentStatus(StrEnum):
    """R5: what an agent's channel is doing, derived from its queue and turn."""

    IDLE = "idle"
    WORKING = "working"
    QUEUED = "queued"


OPEN_STATES: frozenset[MessageState] = frozenset(
    {MessageState.BUFFERED, MessageState.QUEUED, MessageState.WORKING}
)
TERMINAL_STATES: frozenset[MessageState] = frozenset(MessageState) - OPEN_STATES

#: The allowed moves of a message: state -> the states it may go to.
MESSAGE_MOVES: dict[MessageState, frozenset[MessageState]] = {
    MessageState.BUFFERED: frozenset({MessageState.QUEUED, MessageState.DROPPED}),
    # cancelled: a turn stopped (interrupt, removal) before it started, while it
    # waited on a mirror's session read
    MessageState.QUEUED: frozenset(
        {MessageState.WORKING, MessageState.BUFFERED, MessageState.CANCELLED}
    ),
    MessageState.WORKING: frozenset(
        {
            MessageState.WORKING,
            MessageState.DONE,
            MessageState.FAILED,
            MessageState.CANCELLED,
        }
    ),
    MessageState.FAILED: frozenset({MessageState.DONE}),
    MessageState.DONE: frozenset(),
    MessageState.CANCELLED: frozenset(),
    MessageState.DROPPED: frozenset(),
}

#: The allowed moves of a thread record. A single-threaded conversation's one
#: record goes back to `working` at each turn (R4), also from `working` when a
#: restart re-runs the turn it was in (R28); `ok -> error` is R21 (the mirror refused
#: the stored reply for good) and `error -> ok` its late delivery.
THREAD_MOVES: dict[ThreadStatus, frozenset[ThreadStatus]] = {
    ThreadStatus.WORKING: frozenset({ThreadStatus.WORKING, ThreadStatus.OK, ThreadStatus.ERROR}),
    ThreadStatus.OK: frozenset({ThreadStatus.WORKING, ThreadStatus.ERROR}),
    ThreadStatus.ERROR: frozenset({ThreadStatus.WORKING, ThreadStatus.OK}),
}


class IllegalMove(RuntimeError):
    """A state change the life of a message does not allow: always a bug."""


def check_message_move(source: MessageState, target: MessageState) -> None:
    if target not in MESSAGE_MOVES[source]:
        raise IllegalMove(f"a {source} message cannot become {target}")


def check_thread_move(source: ThreadStatus, target: ThreadStatus) -> None:
    if target not in THREAD_MOVES[source]:
        raise IllegalMove(f"a {source} thread record cannot become {target}")


def moved(
    messages: Iterable[Message], target: MessageState, error: str | None = None
) -> list[Message]:
    """The messages in state ``target`` (new records), each move checked first."""
    result = []
    for message in messages:
        check_message_move(message.state, target)
        result.append(replace(message, state=target, error=error))
    return result


def started(messages: Sequence[Message], thread_id: str) -> list[Message]:
    """R12/R28: a turn starts: `working`, one more attempt, tied to its record."""
    for message in messages:
        check_message_move(message.state, MessageState.WORKING)
    return [
        replace(
            message,
            state=MessageState.WORKING,
            error=None,
            attempts=message.attempts + 1,
            thread_id=thread_id,
        )
        for message in messages
    ]


def thread_moved(thread: ThreadRecord, target: ThreadStatus, **changes: object) -> ThreadRecord:
    check_thread_move(thread.status, target)
    return replace(thread, status=target, **changes)  # type: ignore[arg-type]


def sql_state(state: MessageState | ThreadStatus) -> str:
    """One state as an SQL literal, ``'queued'`` (spelled into query text, as below)."""
    return f"'{state.value}'"


def sql_states(states: Iterable[MessageState]) -> str:
    """States as an SQL list, ``('queued', 'working')``, for ``state IN ...``.

    Spelled into the query text rather than bound: SQLite only uses a partial
    index (``messages_open``) when the query's own text implies its condition.
    """
    return "(" + ", ".join(f"'{state.value}'" for state in sorted(states)) + ")"


# -- how a turn ends, decided in pure code (turn.py carries it out) ----------------


class CallbackStatus(StrEnum):
    """R22: what a callback tells the sender."""

    OK = "ok"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything about a turn's end that can be decided before any I/O.

    `Turn._conclude` carries it out in the spec's order; nothing there decides
    again what state, record, reply, event, callback or metric a turn gets.
    """

    #: The inbound messages' terminal state.
    state: MessageState
    #: The thread record's status and output (R16, R17, R21).
    thread_status: ThreadStatus
    output: str
    #: The outbound message's text; empty posts nothing (R19).
    reply: str
    #: The inbound messages' ``error``.
    error: str | None
    #: The final turn event (R24): `done` with the reply, or `error` with the reason.
    event_ok: bool
    event_text: str
    #: R22's status for a requesting channel.
    callback: CallbackStatus
    #: The ``skydeck_turns`` label: ok, error, timeout or cancelled.
    metric: str
    #: The session the backend echoed (persisted, R18), and this turn's usage.
    session: str | None = None
    usage: dict[str, object] | None = None
    #: R16: a failure's `error` event goes out before the mirror delivers its reply.
    announce_first: bool = False
    #: A cancelled turn never ended: it is not counted (R17) and posts nothing.
    counted: bool = True

    @property
    def ok(self) -> bool:
        return self.state is MessageState.DONE


def succeeded(reply: str, session: str | None, usage: dict[str, object] | None) -> Outcome:
    """R17/R19/R24."""
    return Outcome(
        state=MessageState.DONE,
        thread_status=ThreadStatus.OK,
        output=reply,
        reply=reply,
        error=None,
        event_ok=True,
        event_text=reply,
        callback=CallbackStatus.OK,
        metric="ok",
        session=session,
        usage=usage,
    )


def failed(reason: str, reply: str, *, session: str | None, timed_out: bool) -> Outcome:
    """R16 (``reply`` is the failure reply's text)."""
    return Outcome(
        state=MessageState.FAILED,
        thread_status=ThreadStatus.ERROR,
        output=reason,
        reply=reply,
        error=reason,
        event_ok=False,
        event_text=reason,
        callback=CallbackStatus.ERROR,
        metric="timeout" if timed_out else "error",
        session=session,
        announce_first=True,
    )


def undelivered(outcome: Outcome, error: str) -> Outcome:
    """R21: the reply was produced and stored, the mirror refused it for good.

    The same turn, revised: its record says so (no second count), the inbound
    fails, and everyone is told `error`.
    """
    return replace(
        outcome,
        state=MessageState.FAILED,
        thread_status=ThreadStatus.ERROR,
        output=(
            f"reply produced but NOT delivered (outbound write failed: {error}). "
            f"Undelivered reply text: {outcome.reply}"
        ),
        error=f"outbound write failed: {error}",
        event_ok=False,
        event_text=f"reply produced but not saved: {error}",
        callback=CallbackStatus.ERROR,
        metric="error",
    )


def cancelled(reason: str) -> Outcome:
    """R26/R9: stopped before it ended; recorded, not counted, no reply."""
    return Outcome(
        state=MessageState.CANCELLED,
        thread_status=ThreadStatus.ERROR,
        output=reason,
        reply="",
        error=reason,
        event_ok=False,
        event_text=reason,
        callback=CallbackStatus.ERROR,
        metric="cancelled",
        counted=False,
    )
