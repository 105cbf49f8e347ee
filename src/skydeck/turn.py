"""One turn, its side effects in order (behavior.md R11-R25).

The channel task creates a `Turn` for the message(s) it took off its queue and
awaits `Turn.run`. Everything a turn writes goes through the store first, so
the system of record is right even when an extra sink or a live viewer fails;
those failures are logged and never re-run the turn or escape into the
channel task (R25).

Order of a successful turn: session read (R11) -> thread record `working`
(R12) -> backend (R13/R14) -> one transaction with the thread record `ok`, the
reply and the inbound's terminal state (R17/R19) -> the mirror (a vault), if
the channel has one: reply with retry (R20, R21 on final failure), thread
record -> event `done` (R24) -> callback (R22, R22a).
A failed turn: thread record `error` + failure reply + state in one
transaction (R16) -> event `error` -> mirror -> callback.

When the store loses a turn's writes (`flushed()` raises `StoreFailure`), the
turn stops right there, with no further write or side effect: its messages
stay as the store last had them (`queued`, or `working` with the attempt
counted) and the channel task replays them once the store commits again, as a
restart would (R28). A turn also never starts on messages read before a store
failure (``epoch``): they may be rows that were rolled back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import trio

from .backends.base import Backend, BackendError, EventKind
from .errors import StoreFailure, unwrap
from .events import TurnEvents
from .model import (
    Accepted,
    AgentSpec,
    Inbound,
    Message,
    ThreadRecord,
    TurnEvent,
    TurnResult,
    TurnSession,
    new_id,
)
from .store import Store
from .transports.base import DeliveryError, Mirror, with_retry

log = logging.getLogger(__name__)

#: R28: a message found `working` at start this many times is failed, not re-run.
MAX_ATTEMPTS = 3
#: R23: incoming depth at which no callback is delivered any more.
MAX_DELEGATION_DEPTH = 8
#: R16: longest reason quoted in a failure reply.
REASON_LIMIT = 240

RESTARTS_REASON = f"interrupted {MAX_ATTEMPTS} times by daemon restarts"
#: A mirror's session read or thread write never holds a turn longer than this.
MIRROR_TIMEOUT_S = 15.0


def failure_reply_text(reason: str) -> str:
    """R16, to the character."""
    short = f"{reason[:REASON_LIMIT]}…" if len(reason) > REASON_LIMIT else reason
    return (
        f"⚠️ I couldn't complete that — the turn failed: {short}\n\n"
        "This is often temporary; please try again in a moment."
    )


def callback_text(channel: str, status: Literal["ok", "error"]) -> str:
    """R22: the brief notification; the sender pulls the full result from the metadata."""
    verb = "finished (ok)" if status == "ok" else "finished with an error"
    return (
        f"[callback] {channel} {verb} — see source_message / source_thread in this "
        "note's metadata to pull the full result."
    )


def add_usage(total: dict[str, Any] | None, turn: dict[str, Any] | None) -> dict[str, Any] | None:
    """A conversation's usage: numbers summed across turns (nested counters too);
    anything else (a model name, a tier) shows the latest turn's value."""
    if not total or turn is None:
        return turn or total
    out = dict(total)
    for key, value in turn.items():
        before = out.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            out[key] = add_usage(before, value)
        elif (
            isinstance(value, int | float)
            and isinstance(before, int | float)
            and not isinstance(value, bool)
            and not isinstance(before, bool)
        ):
            out[key] = before + value
        else:
            out[key] = value
    return out


def describe(exc: BaseException) -> str:
    """R15: an exception as a readable reason (a lone exception in a group is unwrapped)."""
    exc = unwrap(exc)
    text = str(exc)
    return text if text else type(exc).__name__


@dataclass(slots=True)
class TurnDeps:
    """What a turn needs from the daemon; passed in so tests can swap any part."""

    store: Store
    events: TurnEvents
    backends: Mapping[str, Backend]
    submit: Callable[[Inbound], Accepted]
    mirror: Mirror | None = None
    #: (outcome, seconds, messages): outcome is ok, error, timeout or cancelled.
    on_finished: Callable[[str, float, int], None] | None = None
    on_outbound_retry: Callable[[], None] | None = None


class Turn:
    """One run of an agent's backend for one or more messages of its channel."""

    def __init__(
        self, deps: TurnDeps, agent: AgentSpec, messages: Sequence[Message], *, epoch: int
    ) -> None:
        """``epoch``: `Store.failures` when ``messages`` were read from the store."""
        self.deps = deps
        self.epoch = epoch
        self.agent = agent
        self.messages = list(messages)
        self.channel = agent.channel
        self.prompt = "\n\n".join(message.content for message in self.messages)
        self.thread = self._thread_record()
        mirror = deps.mirror
        self.mirror = mirror if mirror is not None and mirror.serves(self.channel) else None
        self._scope = trio.CancelScope()
        self._ended = False
        self._timed_out = False
        self._started = time.monotonic()

    def _thread_record(self) -> ThreadRecord:
        """R4/R12: a multi-threaded turn gets a record of its own; a single-threaded
        agent's turns all write its one conversation record (started once,
        counted per ended turn, showing the latest turn)."""
        agent = self.agent
        previous = (
            self.deps.store.conversation(agent.name) if agent.mode == "single-threaded" else None
        )
        fresh = ThreadRecord(
            id=new_id(),
            channel=self.channel,
            agent=agent.name,
            mode=agent.mode,
            status="working",
            input=self.prompt,
            message_id=self.messages[0].id,
        )
        if previous is None:
            return fresh
        return replace(
            previous,
            channel=self.channel,
            status="working",
            input=self.prompt,
            output="",
            ended_at=None,
            message_id=fresh.message_id,
        )

    # -- control ------------------------------------------------------------------

    async def run(self) -> None:
        """Run the turn. Returns normally when it ends, or when `cancel` stopped it."""
        with self._scope:
            try:
                await self._run()
            except trio.Cancelled:
                if not self._ended:
                    log.info(
                        "turn stopped before it ended; it runs again at next start",
                        extra={"channel": self.channel, "message_id": self.messages[0].id},
                    )
                raise
            except StoreFailure as exc:
                log.warning(
                    "turn stopped: the store lost its writes; it runs again once the store "
                    "commits again",
                    extra={
                        "channel": self.channel,
                        "message_id": self.messages[0].id,
                        "reason": exc.reason,
                    },
                )
                raise

    def cancel(self, reason: str) -> None:
        """Stop this turn and record it `cancelled` with ``reason`` (R26, R9 interrupt).

        Recording happens here, synchronously, so by the time the caller goes on
        (say, to register another agent on the channel) the store already shows
        the message as terminal and nothing can pick it up again. A turn that
        already reached its end record only has its remaining side effects cut.
        """
        if not self._ended:
            self._ended = True
            self._guard("thread record", self.deps.store.end_thread, self.thread, "error", reason)
            # A store failure here leaves the messages `working`; they replay (R28).
            store = self.deps.store
            self._guard("message states", store.set_state, self.messages, "cancelled", reason)
            self._publish("error", {"error": reason})
            self._callbacks("error", None, None)
            self._finished("cancelled")
        self._scope.cancel()

    # -- the pipeline -------------------------------------------------------------

    async def _run(self) -> None:
        # Each ensure_unchanged is followed by start_turn with no checkpoint between,
        # so no store failure can slip in after the check.
        if any(message.attempts >= MAX_ATTEMPTS for message in self.messages):
            self.deps.store.ensure_unchanged(self.epoch)
            self.deps.store.start_turn([], self.thread)
            await self._fail(RESTARTS_REASON, echoed_session=None)
            return
        session = await self._session()
        self.deps.store.ensure_unchanged(self.epoch)
        self.deps.store.start_turn(self.messages, self.thread)
        await self.deps.store.flushed()  # the attempt counts even if we crash mid-turn (R28)
        await self._mirror_thread("start")
        backend = self.deps.backends.get(self.agent.backend)
        try:
            if backend is None:
                raise BackendError(f"the {self.agent.backend} backend is not available here")
            with trio.move_on_after(self.agent.timeout_s) as deadline:
                result = await backend.deliver(self.agent, self.prompt, session, self._emit)
            if deadline.cancelled_caught:
                self._timed_out = True
                raise BackendError(f"turn timed out after {self.agent.timeout_s} s")
        except BackendError as exc:
            await self._fail(exc.reason, echoed_session=exc.session_id)
        except Exception as exc:
            log.exception("backend raised", extra={"channel": self.channel})
            await self._fail(describe(exc), echoed_session=None)
        else:
            await self._succeed(result)

    async def _session(self) -> TurnSession:
        """R11: resume the stored session (single-threaded), else a fresh uuid.

        The local store is the system of record; a mirrored channel with no local
        session yet (say, moved over from parachute-agent) resumes the one its
        thread note holds.
        """
        if self.agent.mode == "single-threaded":
            stored = self.deps.store.get_session(self.agent.name)
            if not stored and self.mirror is not None:
                try:
                    with trio.move_on_after(MIRROR_TIMEOUT_S):
                        stored = await self.mirror.read_session(self.agent)
                except Exception:  # R25 (upstream bug 13: this must never stall the channel)
                    log.exception(
                        "reading the mirrored session failed", extra={"channel": self.channel}
                    )
            if stored:
                return TurnSession(id=stored, resume=True)
        return TurnSession(id=str(uuid.uuid4()), resume=False)

    async def _succeed(self, result: TurnResult) -> None:
        thread = self.thread
        thread.status, thread.output = "ok", result.reply
        thread.usage = add_usage(thread.usage, result.usage)
        thread.session = result.session_id or thread.session
        reply = await self._end("done", result.reply, error=None, persist_session=True)
        try:
            remote_id = await self._mirror_reply(reply)
        except DeliveryError as error:
            await self._undelivered(reply, error)
            return
        await self._mirror_thread("end")
        self._settle("done")
        self._publish("done", {"reply": result.reply})
        self._callbacks("ok", reply, remote_id)
        self._finished("ok")

    async def _undelivered(self, reply: Message | None, error: DeliveryError) -> None:
        """R21: produced but not delivered. Same turn, same record: no second count."""
        log.error(
            "reply produced but not delivered",
            extra={"channel": self.channel, "error": str(error)},
        )
        thread = self.thread
        thread.status = "error"
        thread.output = (
            f"reply produced but NOT delivered (outbound write failed: {error}). "
            f"Undelivered reply text: {reply.content if reply else ''}"
        )
        self._guard("thread record", self.deps.store.rewrite_thread, thread)
        self.deps.store.set_state(self.messages, "failed", f"outbound write failed: {error}")
        await self._mirror_thread("end")
        if error.transient and reply is not None and self.mirror is not None:
            # The reply is safe in the local store; the outbox keeps trying to
            # deliver it, and turns the records to ok when it lands.
            self._guard("outbox", self.mirror.defer_reply, reply, thread)
        self._publish("error", {"error": f"reply produced but not saved: {error}"})
        self._callbacks("error", None, None)
        self._finished("error")

    async def _fail(self, reason: str, *, echoed_session: str | None) -> None:
        """R16: record, tell live viewers, post the failure reply, call back."""
        log.warning("turn failed", extra={"channel": self.channel, "reason": reason})
        thread = self.thread
        thread.status, thread.output = "error", reason
        thread.session = echoed_session or thread.session
        reply = await self._end(
            "failed",
            failure_reply_text(reason),
            error=reason,
            persist_session=echoed_session is not None,
        )
        self._publish("error", {"error": reason})
        try:
            await self._mirror_reply(reply)
        except DeliveryError as error:
            log.error(
                "failure reply not delivered", extra={"channel": self.channel, "error": str(error)}
            )
        await self._mirror_thread("end")
        self._settle("failed", reason)
        self._callbacks("error", None, None)
        self._finished("timeout" if self._timed_out else "error")

    async def _end(
        self,
        state: Literal["done", "failed"],
        reply: str,
        *,
        error: str | None,
        persist_session: bool,
    ) -> Message | None:
        self._ended = True
        # A mirrored channel's messages stay `working` until the reply has landed
        # there too (`_settle`): `done` means delivered everywhere.
        outbound = self.deps.store.end_turn(
            self.messages,
            self.thread,
            state="working" if self.mirror is not None else state,
            reply=reply,
            error=error,
            persist_session=persist_session,
        )
        # Durable before anyone is told: a viewer never sees a reply a crash could undo.
        await self.deps.store.flushed()
        return outbound

    def _settle(self, state: Literal["done", "failed"], error: str | None = None) -> None:
        if self.mirror is not None:
            self.deps.store.set_state(self.messages, state, error)

    async def _mirror_reply(self, reply: Message | None) -> str | None:
        """R20: write the reply to the mirror (if any); its id there, or raise."""
        if self.mirror is None or reply is None:
            return None
        mirror = self.mirror
        remote_id = await with_retry(
            lambda: mirror.write_reply(reply, self.messages[0]),
            channel=self.channel,
            on_retry=self.deps.on_outbound_retry,
        )
        self._guard("remote id", self.deps.store.set_remote_id, reply, remote_id)
        return remote_id

    async def _mirror_thread(self, phase: Literal["start", "end"]) -> None:
        """The thread record, mirrored best-effort (R25): never retried, never fatal."""
        if self.mirror is None:
            return
        try:
            with trio.move_on_after(MIRROR_TIMEOUT_S):
                await self.mirror.write_thread(self.thread, phase, self.messages[0])
        except Exception as exc:
            log.warning(
                "thread record not mirrored",
                extra={"channel": self.channel, "phase": phase, "error": describe(exc)},
            )

    def _callbacks(
        self, status: Literal["ok", "error"], reply: Message | None, remote_id: str | None
    ) -> None:
        """R22/R23: tell each requesting channel that this turn ended.

        A sender served by the mirror gets the callback only there (R22a), with
        the mirror's id of the reply; a local sender gets it locally.
        """
        mirror = self.deps.mirror
        for message in self.messages:
            reply_to = message.reply_to
            if reply_to is None:
                continue
            depth = message.delegation_depth
            if depth >= MAX_DELEGATION_DEPTH:
                log.warning(
                    "delegation depth limit reached: no callback delivered",
                    extra={"channel": self.channel, "reply_to": reply_to, "depth": depth},
                )
                continue
            metadata: dict[str, Any] = {
                "callback": "true",
                "status": status,
                "source_channel": self.channel,
                "source_thread": self.thread.id,
            }
            remote = mirror is not None and mirror.serves(reply_to)
            source_message = remote_id if remote else (reply.id if reply else None)
            if source_message is not None:
                metadata["source_message"] = source_message
            if "correlation_id" in message.metadata:
                metadata["correlation_id"] = message.metadata["correlation_id"]
            metadata["delegation_depth"] = str(depth + 1)
            inbound = Inbound(
                channel=reply_to, content=callback_text(self.channel, status), metadata=metadata
            )
            if remote and mirror is not None:
                self._guard("callback", mirror.queue_callback, inbound)
            else:
                self._guard("callback", self.deps.submit, inbound)

    # -- side effects that must never break the turn (R25) ------------------------

    def _emit(self, kind: EventKind, data: dict[str, Any]) -> None:
        self._publish(kind, data)

    def _publish(
        self, kind: Literal["init", "text", "tool", "done", "error"], data: dict[str, Any]
    ) -> None:
        event = TurnEvent(kind=kind, message_id=self.messages[0].id, data=data)
        self._guard("turn event", self.deps.events.publish, self.channel, event)

    def _finished(self, outcome: str) -> None:
        elapsed = time.monotonic() - self._started
        log.info(
            "turn finished",
            extra={
                "channel": self.channel,
                "message_id": self.messages[0].id,
                "outcome": outcome,
                "duration_ms": round(elapsed * 1000, 1),
            },
        )
        if self.deps.on_finished is not None:
            self._guard("turn metrics", self.deps.on_finished, outcome, elapsed, len(self.messages))

    def _guard(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception(f"{what} failed (the turn goes on)", extra={"channel": self.channel})
