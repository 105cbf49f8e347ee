"""One turn, its side effects in order (behavior.md R11-R25).

The channel task creates a `Turn` for the message(s) it took off its queue and
awaits `Turn.run`. Everything a turn writes goes through the store first, so
the system of record is right even when an extra sink or a live viewer fails;
those failures are logged and never re-run the turn or escape into the
channel task (R25).

Order of a successful turn: session read (R11) -> thread record `working`
(R12) -> backend (R13/R14), inside the turn's MCP token (mcp.md M8) -> one
transaction with the thread record `ok`, the reply and the inbound's terminal
state (R17/R19) -> the mirror (a vault), if the channel has one: reply with
retry (R20, R21 on final failure), thread record -> event `done` (R24) -> callback (R22, R22a).
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio

from . import ledger
from .backends.base import Backend
from .backends.base import EventKind as BackendEventKind
from .errors import BackendError, DeliveryError, FencedOut, StoreFailure, unwrap
from .events import TurnEvents
from .ledger import CallbackStatus, MessageState, Outcome, ThreadStatus
from .model import (
    Accepted,
    AgentSpec,
    EventKind,
    Inbound,
    Message,
    ThreadRecord,
    ToolAccess,
    TurnEvent,
    TurnSession,
    new_id,
)
from .store import Fence, Store
from .transports.base import Mirror, with_retry

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


def callback_text(channel: str, status: CallbackStatus) -> str:
    """R22: the brief notification; the sender pulls the full result from the metadata."""
    verb = "finished (ok)" if status is CallbackStatus.OK else "finished with an error"
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


def callbacks_for(
    messages: Sequence[Message],
    *,
    channel: str,
    thread_id: str,
    status: CallbackStatus,
    reply_id: str | None,
    remote_id: str | None,
    remote: Callable[[str], bool],
) -> list[tuple[Inbound, bool]]:
    """R22/R23: the callback each requesting channel gets, and whether it goes to
    the mirror (R22a: a sender served there gets it only there, with the
    mirror's id of the reply). Pure: the turn routes what this returns."""
    out = []
    for message in messages:
        reply_to = message.reply_to
        if reply_to is None:
            continue
        depth = message.delegation_depth
        if depth >= MAX_DELEGATION_DEPTH:
            log.warning(
                "delegation depth limit reached: no callback delivered",
                extra={"channel": channel, "reply_to": reply_to, "depth": depth},
            )
            continue
        metadata: dict[str, Any] = {
            "callback": "true",
            "status": status.value,
            "source_channel": channel,
            "source_thread": thread_id,
        }
        via_mirror = remote(reply_to)
        source_message = remote_id if via_mirror else reply_id
        if source_message is not None:
            metadata["source_message"] = source_message
        if "correlation_id" in message.metadata:
            metadata["correlation_id"] = message.metadata["correlation_id"]
        metadata["delegation_depth"] = str(depth + 1)
        text = callback_text(channel, status)
        out.append((Inbound(channel=reply_to, content=text, metadata=metadata), via_mirror))
    return out


class ToolGate(Protocol):
    """Hands a turn's backend its MCP access (`mcp.wiring.TurnTools`)."""

    def open(
        self, agent: AgentSpec, thread_id: str, messages: Sequence[Message], fence: Fence
    ) -> AbstractAsyncContextManager[ToolAccess | None]: ...


@dataclass(slots=True)
class TurnDeps:
    """What a turn needs from the daemon; passed in so tests can swap any part."""

    store: Store
    events: TurnEvents
    backends: Mapping[str, Backend]
    mirror: Mirror | None = None
    #: (outcome, the messages' final state, seconds, messages): outcome is ok,
    #: error, timeout or cancelled.
    on_finished: Callable[[str, MessageState, float, int], None] | None = None
    on_outbound_retry: Callable[[], None] | None = None
    #: S23: the sandbox mode an agent's turn runs in, for the `turn finished` line.
    sandbox_mode: Callable[[AgentSpec], str] | None = None
    #: mcp.md M8: the turn token and config around the backend call (None: no tools).
    tools: ToolGate | None = None


class Turn:
    """One run of an agent's backend for one or more messages of its channel."""

    def __init__(
        self,
        deps: TurnDeps,
        agent: AgentSpec,
        messages: Sequence[Message],
        *,
        epoch: int,
        fence: Fence,
        submit: Callable[[Inbound], Awaitable[Accepted]],
    ) -> None:
        """``epoch``: `Store.failures` when ``messages`` were read from the store;
        ``fence``: the channel's, carried by every write the turn makes;
        ``submit``: where callbacks to local channels go (the registry's)."""
        self.deps = deps
        self.epoch = epoch
        self.fence = fence
        self.submit = submit
        self.agent = agent
        self.messages = list(messages)
        self.channel = agent.channel
        self.prompt = "\n\n".join(message.content for message in self.messages)
        #: Replaced by the conversation's record, for a single-threaded agent, as the turn runs.
        self.thread = self._fresh_thread()
        mirror = deps.mirror
        self.mirror = mirror if mirror is not None and mirror.serves(self.channel) else None
        self._scope = trio.CancelScope()
        #: The session the local store held when the turn began (R18: unchanged, unwritten).
        self._resumed: str | None = None
        #: Whether the turn wrote its start record (R12).
        self._began = False
        self._ended = False
        #: Set by `_conclude` until the messages are terminal: (outcome, stored reply).
        self._unsettled: tuple[Outcome, Message | None] | None = None
        self._timed_out = False
        self._started = time.monotonic()

    def _fresh_thread(self) -> ThreadRecord:
        return ThreadRecord(
            id=new_id(),
            channel=self.channel,
            agent=self.agent.name,
            mode=self.agent.mode,
            status=ThreadStatus.WORKING,
            input=self.prompt,
            message_id=self.messages[0].id,
        )

    async def _thread_record(self) -> ThreadRecord:
        """R4/R12: a multi-threaded turn gets a record of its own; a single-threaded
        agent's turns all write its one conversation record (started once,
        counted per ended turn, showing the latest turn)."""
        if self.agent.mode != "single-threaded":
            return self.thread
        previous = await self.deps.store.conversation(self.agent.name)
        if previous is None:
            return self.thread
        return ledger.thread_moved(
            previous,
            ThreadStatus.WORKING,
            channel=self.channel,
            input=self.prompt,
            output="",
            ended_at=None,
            message_id=self.thread.message_id,
        )

    # -- control ------------------------------------------------------------------

    async def run(self) -> None:
        """Run the turn. Returns normally when it ends, or when `cancel` stopped it."""
        with self._scope:
            try:
                await self._run()
            except trio.Cancelled:
                # Cut between its end record and its mirror (interrupt, removal,
                # shutdown): settle it now, or it would run again at next start.
                with trio.CancelScope(shield=True):
                    await self._settle_now()
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

    async def cancel(self, reason: str) -> None:
        """Stop this turn and record it `cancelled` with ``reason`` (R26, R9 interrupt).

        Recording happens here, before this returns, so by the time the caller goes on
        (say, to register another agent on the channel) the store already shows
        the message as terminal and nothing can pick it up again. A turn that
        already reached its end record only has its remaining side effects cut.
        """
        if not self._ended:
            self._ended = True
            outcome = ledger.cancelled(reason)
            store = self.deps.store
            # Each write on its own (R25); a store failure leaves the messages
            # `working`, and they replay (R28). A turn stopped before it started
            # (waiting on the mirror's session) wrote no record to end.
            fenced = False
            try:
                if self._began:
                    self.thread = await store.end_thread(
                        self.thread, outcome.thread_status, outcome.output, self.fence
                    )
            except FencedOut:
                fenced = True
            except Exception:
                log.exception("thread record failed", extra={"channel": self.channel})
            if not fenced:
                try:
                    self.messages = await store.set_state(
                        self.messages, outcome.state, self.fence, outcome.error
                    )
                except FencedOut:
                    fenced = True
                except Exception:
                    log.exception("message states failed", extra={"channel": self.channel})
            if fenced:
                # P11: another host holds the channel and replays these messages;
                # nothing more from here (no event, no callback), as at a turn's end.
                log.warning("cancel stopped: write fenced", extra={"channel": self.channel})
                self._scope.cancel()
                return
            self._announce(outcome)
            await self._call_back(outcome.callback, None, None)
            self._finished(outcome)
        self._scope.cancel()

    # -- the pipeline -------------------------------------------------------------

    async def _run(self) -> None:
        # Each ensure_unchanged is followed by start_turn with no await of another
        # store operation between, so no failure of this store slips in after the check.
        store = self.deps.store
        self.thread = await self._thread_record()
        if any(message.attempts >= MAX_ATTEMPTS for message in self.messages):
            store.ensure_unchanged(self.epoch)
            await store.start_turn([], self.thread, self.fence)
            await self._conclude(self._failed(RESTARTS_REASON, session=None))
            return
        session = await self._session()
        store.ensure_unchanged(self.epoch)
        self.messages = await store.start_turn(self.messages, self.thread, self.fence)
        self._began = True
        await self.deps.store.flushed()  # the attempt counts even if we crash mid-turn (R28)
        await self._mirror_thread("start")
        backend = self.deps.backends.get(self.agent.backend)
        try:
            if backend is None:
                raise BackendError(f"the {self.agent.backend} backend is not available here")
            with trio.move_on_after(self.agent.timeout_s) as deadline:
                # mcp.md M8: the turn's token lives exactly as long as this call.
                async with self._tools() as tools:
                    result = await backend.deliver(
                        self.agent, self.prompt, session, self._emit, tools=tools
                    )
            if deadline.cancelled_caught:
                self._timed_out = True
                raise BackendError(f"turn timed out after {self.agent.timeout_s} s")
        except BackendError as exc:
            outcome = self._failed(exc.reason, session=exc.session_id)
        except Exception as exc:
            log.exception("backend raised", extra={"channel": self.channel})
            outcome = self._failed(describe(exc), session=None)
        else:
            outcome = ledger.succeeded(result.reply, result.session_id, result.usage)
        await self._conclude(outcome)

    def _tools(self) -> AbstractAsyncContextManager[ToolAccess | None]:
        gate = self.deps.tools
        if gate is None:
            return nullcontext(None)
        return gate.open(self.agent, self.thread.id, self.messages, self.fence)

    def _failed(self, reason: str, *, session: str | None) -> Outcome:
        log.warning("turn failed", extra={"channel": self.channel, "reason": reason})
        return ledger.failed(
            reason, failure_reply_text(reason), session=session, timed_out=self._timed_out
        )

    async def _session(self) -> TurnSession:
        """R11: resume the stored session (single-threaded), else a fresh uuid.

        The local store is the system of record; a mirrored channel with no local
        session yet (say, moved over from parachute-agent) resumes the one its
        thread note holds.
        """
        if self.agent.mode == "single-threaded":
            stored = self._resumed = await self.deps.store.get_session(self.agent.name)
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

    async def _conclude(self, outcome: Outcome) -> None:
        """Carry out how the turn ended, in the spec's order (R16-R24).

        Store first, in one transaction, durable before anyone is told (a
        viewer never sees a reply a crash could undo); then the mirror (a
        vault), the final event, the callbacks, the metrics. The only decision
        left here is R21: a reply the mirror refused for good revises the
        outcome (`ledger.undelivered`) — the same turn, the same record.
        """
        self._ended = True
        thread = ledger.thread_moved(
            self.thread,
            outcome.thread_status,
            output=outcome.output,
            usage=add_usage(self.thread.usage, outcome.usage),
            session=outcome.session or self.thread.session,
        )
        # A mirrored channel's messages stay `working` until the reply has landed
        # there too (below): `done` means delivered everywhere.
        store = self.deps.store
        self.messages, reply, self.thread = await store.end_turn(
            self.messages,
            thread,
            self.fence,
            state=MessageState.WORKING if self.mirror is not None else outcome.state,
            reply=outcome.reply,
            error=outcome.error,
            # R18: only an echoed session is kept, and only a new one needs writing.
            persist_session=outcome.session is not None and outcome.session != self._resumed,
        )
        if self.mirror is not None:
            self._unsettled = (outcome, reply)
        await store.flushed()
        if outcome.announce_first:
            self._announce(outcome)
        remote_id, refused = await self._mirror_reply(reply, outcome)
        if refused is not None:
            outcome = ledger.undelivered(outcome, str(refused))
            log.error(
                "reply produced but not delivered",
                extra={"channel": self.channel, "error": str(refused)},
            )
            self.thread = ledger.thread_moved(
                self.thread, outcome.thread_status, output=outcome.output
            )
            await self._guard("thread record", store.rewrite_thread, self.thread, self.fence)
            self.messages = await store.set_state(
                self.messages, outcome.state, self.fence, outcome.error
            )
            self._unsettled = None
        await self._mirror_thread("end")
        if refused is not None:
            if refused.transient and reply is not None and self.mirror is not None:
                # The reply is safe in the local store; the outbox keeps trying to
                # deliver it, and turns the records to ok when it lands.
                await self._guard("outbox", self.mirror.defer_reply, reply, self.thread, self.fence)
        elif self._unsettled is not None:
            self.messages = await store.set_state(
                self.messages, outcome.state, self.fence, outcome.error
            )
            self._unsettled = None
        if not outcome.announce_first:
            self._announce(outcome)
        delivered = reply if outcome.ok else None
        await self._call_back(outcome.callback, delivered, remote_id)
        self._finished(outcome)

    async def _settle_now(self) -> None:
        """A mirrored turn stopped after its end record: its messages take their
        terminal state now, and the outbox delivers the stored reply later (a
        successful turn's; a failure reply is not worth a retry)."""
        if self._unsettled is None:
            return
        outcome, reply = self._unsettled
        self._unsettled = None
        try:
            self.messages = await self.deps.store.set_state(
                self.messages, outcome.state, self.fence, outcome.error
            )
        except Exception:  # the store is failing: they stay `working` and replay (R28)
            log.exception("settling the stopped turn failed", extra={"channel": self.channel})
            return
        if outcome.ok and reply is not None and self.mirror is not None:
            await self._guard("outbox", self.mirror.defer_reply, reply, self.thread, self.fence)

    async def _mirror_reply(
        self, reply: Message | None, outcome: Outcome
    ) -> tuple[str | None, DeliveryError | None]:
        """R20: write the reply to the mirror (if any): (its id there, None), or,
        for a successful turn's reply refused for good, (None, the error)."""
        if self.mirror is None or reply is None:
            return None, None
        mirror, inbound = self.mirror, self.messages[0]
        try:
            remote_id = await with_retry(
                lambda: mirror.write_reply(reply, inbound),
                channel=self.channel,
                on_retry=self.deps.on_outbound_retry,
            )
        except DeliveryError as error:
            if outcome.ok:
                return None, error
            log.error(
                "failure reply not delivered", extra={"channel": self.channel, "error": str(error)}
            )
            return None, None
        await self._guard("remote id", self.deps.store.set_remote_id, reply, remote_id, self.fence)
        return remote_id, None

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

    async def _call_back(
        self, status: CallbackStatus, reply: Message | None, remote_id: str | None
    ) -> None:
        """R22/R22a: route each callback — the mirror's senders only there."""
        mirror = self.deps.mirror
        serves = mirror.takes_callbacks if mirror is not None else (lambda _: False)
        for inbound, remote in callbacks_for(
            self.messages,
            channel=self.channel,
            thread_id=self.thread.id,
            status=status,
            reply_id=reply.id if reply else None,
            remote_id=remote_id,
            remote=serves,
        ):
            if remote and mirror is not None:
                await self._guard("callback", mirror.queue_callback, inbound, self.fence)
            else:
                await self._guard("callback", self.submit, inbound)

    # -- side effects that must never break the turn (R25) ------------------------

    def _emit(self, kind: BackendEventKind, data: dict[str, Any]) -> None:
        self._publish(EventKind(kind), data)

    def _announce(self, outcome: Outcome) -> None:
        """R24: the turn's one final event."""
        if outcome.event_ok:
            self._publish(EventKind.DONE, {"reply": outcome.event_text})
        else:
            self._publish(EventKind.ERROR, {"error": outcome.event_text})

    def _publish(self, kind: EventKind, data: dict[str, Any]) -> None:
        event = TurnEvent(kind=kind, message_id=self.messages[0].id, data=data)
        self._guard_now("turn event", self.deps.events.publish, self.channel, event)

    def _finished(self, outcome: Outcome) -> None:
        elapsed = time.monotonic() - self._started
        log.info(
            "turn finished",
            extra={
                "channel": self.channel,
                "message_id": self.messages[0].id,
                "outcome": outcome.metric,
                "duration_ms": round(elapsed * 1000, 1),
                "sandbox": self.deps.sandbox_mode(self.agent) if self.deps.sandbox_mode else "off",
            },
        )
        if self.deps.on_finished is not None:
            self._guard_now(
                "turn metrics",
                self.deps.on_finished,
                outcome.metric,
                outcome.state,
                elapsed,
                len(self.messages),
            )

    def _guard_now(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._log_side_failure(what)

    async def _guard(self, what: str, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            self._log_side_failure(what)

    def _log_side_failure(self, what: str) -> None:
        log.exception(f"{what} failed (the turn goes on)", extra={"channel": self.channel})
