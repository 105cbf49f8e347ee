"""One turn, its side effects in order (behavior.md R11-R25).

The channel task creates a `Turn` for the message(s) it took off its queue and
awaits `Turn.run`. Everything a turn writes goes through the store first, so
the system of record is right even when an extra sink or a live viewer fails;
those failures are logged and never re-run the turn or escape into the
channel task (R25).

Order of a successful turn: session read (R11) -> thread record `working`
(R12) -> backend (R13/R14) -> one transaction with the thread record `ok`, the
reply and the inbound's terminal state (R17/R19) -> extra sinks with retry
(R20, R21 on final failure) -> event `done` (R24) -> callback (R22).
A failed turn: thread record `error` + failure reply + state in one
transaction (R16) -> event `error` -> sinks -> callback.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .backends.base import Backend, BackendError, EventKind
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
from .transports.base import ReplySink, deliver_with_retry

log = logging.getLogger(__name__)

#: R28: a message found `working` at start this many times is failed, not re-run.
MAX_ATTEMPTS = 3
#: R23: incoming depth at which no callback is delivered any more.
MAX_DELEGATION_DEPTH = 8
#: R16: longest reason quoted in a failure reply.
REASON_LIMIT = 240

RESTARTS_REASON = f"interrupted {MAX_ATTEMPTS} times by daemon restarts"


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


def describe(exc: BaseException) -> str:
    """R15: an exception as a readable reason (a lone exception in a group is unwrapped)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc)
    return text if text else type(exc).__name__


@dataclass(slots=True)
class TurnDeps:
    """What a turn needs from the daemon; passed in so tests can swap any part."""

    store: Store
    events: TurnEvents
    backends: Mapping[str, Backend]
    submit: Callable[[Inbound], Accepted]
    sinks: Sequence[ReplySink] = ()
    #: (outcome, seconds, messages): outcome is ok, error, timeout or cancelled.
    on_finished: Callable[[str, float, int], None] | None = None
    on_outbound_retry: Callable[[], None] | None = None


class Turn:
    """One run of an agent's backend for one or more messages of its channel."""

    def __init__(self, deps: TurnDeps, agent: AgentSpec, messages: Sequence[Message]) -> None:
        self.deps = deps
        self.agent = agent
        self.messages = list(messages)
        self.channel = agent.channel
        self.prompt = "\n\n".join(message.content for message in self.messages)
        self.thread = ThreadRecord(
            id=new_id(),
            channel=self.channel,
            agent=agent.name,
            mode=agent.mode,
            status="working",
            input=self.prompt,
            message_id=self.messages[0].id,
        )
        self._scope = trio.CancelScope()
        self._ended = False
        self._timed_out = False
        self._started = time.monotonic()

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
            self.deps.store.set_state(self.messages, "cancelled", reason)
            self._publish("error", {"error": reason})
            self._callbacks("error", None)
            self._finished("cancelled")
        self._scope.cancel()

    # -- the pipeline -------------------------------------------------------------

    async def _run(self) -> None:
        if any(message.attempts >= MAX_ATTEMPTS for message in self.messages):
            self.deps.store.start_turn([], self.thread)
            await self._fail(RESTARTS_REASON, echoed_session=None)
            return
        session = self._session()
        self.deps.store.start_turn(self.messages, self.thread)
        await self.deps.store.flushed()  # the attempt counts even if we crash mid-turn (R28)
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

    def _session(self) -> TurnSession:
        """R11: resume the stored session (single-threaded), else a fresh uuid."""
        if self.agent.mode == "single-threaded":
            stored = self.deps.store.get_session(self.agent.name)
            if stored:
                return TurnSession(id=stored, resume=True)
        return TurnSession(id=str(uuid.uuid4()), resume=False)

    async def _succeed(self, result: TurnResult) -> None:
        thread = self.thread
        thread.status, thread.output = "ok", result.reply
        thread.usage, thread.session = result.usage, result.session_id
        reply = await self._end("done", result.reply, error=None, persist_session=True)
        error = await self._sink(reply) if reply is not None else None
        if error is None:
            self._settle("done")
            self._publish("done", {"reply": result.reply})
            self._callbacks("ok", reply.id if reply else None)
            self._finished("ok")
            return
        # R21: produced but not delivered. Same turn, same record: no second count.
        log.error(
            "reply produced but not delivered", extra={"channel": self.channel, "error": error}
        )
        thread.status = "error"
        thread.output = (
            f"reply produced but NOT delivered (outbound write failed: {error}). "
            f"Undelivered reply text: {result.reply}"
        )
        self._guard("thread record", self.deps.store.rewrite_thread, thread)
        self.deps.store.set_state(self.messages, "failed", f"outbound write failed: {error}")
        self._publish("error", {"error": f"reply produced but not saved: {error}"})
        self._callbacks("error", None)
        self._finished("error")

    async def _fail(self, reason: str, *, echoed_session: str | None) -> None:
        """R16: record, tell live viewers, post the failure reply, call back."""
        log.warning("turn failed", extra={"channel": self.channel, "reason": reason})
        thread = self.thread
        thread.status, thread.output, thread.session = "error", reason, echoed_session
        reply = await self._end(
            "failed",
            failure_reply_text(reason),
            error=reason,
            persist_session=echoed_session is not None,
        )
        self._publish("error", {"error": reason})
        if reply is not None:
            error = await self._sink(reply)
            if error is not None:
                log.error("failure reply not delivered", extra={"channel": self.channel})
        self._settle("failed", reason)
        self._callbacks("error", None)
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
        # With extra sinks the messages stay `working` until the reply has landed
        # there too (`_settle`): `done` means delivered everywhere.
        outbound = self.deps.store.end_turn(
            self.messages,
            self.thread,
            state="working" if self.deps.sinks else state,
            reply=reply,
            error=error,
            persist_session=persist_session,
        )
        # Durable before anyone is told: a viewer never sees a reply a crash could undo.
        await self.deps.store.flushed()
        return outbound

    def _settle(self, state: Literal["done", "failed"], error: str | None = None) -> None:
        if self.deps.sinks:
            self.deps.store.set_state(self.messages, state, error)

    async def _sink(self, reply: Message) -> str | None:
        """R20: every extra sink gets the reply; the first final error is returned."""
        for sink in self.deps.sinks:
            error = await deliver_with_retry(sink, reply, on_retry=self.deps.on_outbound_retry)
            if error is not None:
                return error
        return None

    def _callbacks(self, status: Literal["ok", "error"], source_message: str | None) -> None:
        """R22/R23: tell each requesting channel that this turn ended."""
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
            if source_message is not None:
                metadata["source_message"] = source_message
            if "correlation_id" in message.metadata:
                metadata["correlation_id"] = message.metadata["correlation_id"]
            metadata["delegation_depth"] = str(depth + 1)
            inbound = Inbound(
                channel=reply_to, content=callback_text(self.channel, status), metadata=metadata
            )
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
