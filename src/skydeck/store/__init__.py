"""The store seam: what the daemon asks of its system of record.

One Protocol, `Store`, with the embedded SQLite engine in `store.sqlite` as its
implementation (multi-host.md §7 names a PostgreSQL one to come). Every
operation is ``async`` so that an engine may do network I/O; callers must not
rely on an operation *not* reaching a checkpoint. A write returns once reads
see it; it is durable when `flushed()` returns (SQLite: after the group commit
of its scheduler tick).

Every write a turn makes carries a `Fence`: the channel and the token under
which the writer holds it. An engine that shares channels between hosts
refuses a write whose token is no longer the channel's (`FencedOut`); the
embedded engine is the only holder of every channel, with token 0, and never
refuses one.

Why records go in and new records come out (no operation mutates what it is
handed): a turn keeps the records it was given for its events and callbacks,
and a write that fails must leave them as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import FencedOut
from ..ledger import MessageState, ThreadStatus
from ..model import Accepted, AgentSpec, Inbound, Job, Message, ProcessRecord, ThreadRecord

__all__ = ["Fence", "FencedOut", "Page", "Store"]

#: The host name of the embedded store's only holder.
LOCAL_HOST = "local"


@dataclass(frozen=True, slots=True)
class Fence:
    """Who writes for a channel: a host (and its incarnation) holding the
    channel under ``token``. Tokens of one channel only ever rise, so a write
    under an older token is a paused or dead holder's, and is refused."""

    channel: str
    token: int = 0
    host: str = LOCAL_HOST
    incarnation: int = 0

    @classmethod
    def local(cls, channel: str) -> Fence:
        """The embedded store's fence: one host holds every channel, for good."""
        return cls(channel)


@dataclass(slots=True)
class Page:
    """One page of a channel's transcript, oldest first, with the cursors around it."""

    messages: list[Message]
    next: str | None
    prev: str | None


class Store(Protocol):
    """The system of record: agents, jobs, messages, thread records, sessions."""

    #: `/health` `store.kind` (P26): "sqlite" or "postgres".
    kind: str
    #: Store failures so far (lost write groups); never goes down.
    failures: int
    #: Why the store is failing, until a commit succeeds again; None when healthy.
    error: str | None

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None: ...
    async def flushed(self) -> None: ...
    async def run_flusher(self) -> None: ...
    async def recovered(self, seen: int) -> int: ...
    def ensure_unchanged(self, seen: int) -> None: ...

    # -- meta ---------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...

    # -- agents and jobs ----------------------------------------------------------
    async def save_agent(self, agent: AgentSpec) -> None: ...
    async def create_agent(self, agent: AgentSpec, fence: Fence) -> list[Message]: ...
    async def delete_agent(self, name: str) -> bool: ...
    async def list_agents(self) -> list[AgentSpec]: ...
    async def save_job(self, job: Job) -> None: ...
    async def delete_job(self, name: str) -> bool: ...
    async def list_jobs(self) -> list[Job]: ...
    async def fire_slot(
        self,
        inbound: Inbound,
        *,
        registered: bool,
        buffer_cap: int,
        fired: Callable[[Accepted], Job],
    ) -> tuple[Accepted, Job]: ...

    # -- inbound ------------------------------------------------------------------
    async def accept_inbound(
        self, inbound: Inbound, *, registered: bool, buffer_cap: int
    ) -> Accepted: ...
    async def accept_batch(
        self, items: Sequence[tuple[Inbound, bool]], *, buffer_cap: int
    ) -> list[Accepted]: ...
    async def claim_open(self, channel: str, fence: Fence) -> list[Message]: ...
    async def release_open(self, channel: str, *, buffer_cap: int) -> int: ...

    # -- the turn -----------------------------------------------------------------
    async def start_turn(
        self, messages: Sequence[Message], thread: ThreadRecord, fence: Fence
    ) -> list[Message]: ...
    async def end_turn(
        self,
        messages: Sequence[Message],
        thread: ThreadRecord,
        fence: Fence,
        *,
        state: MessageState,
        reply: str,
        error: str | None,
        persist_session: bool,
    ) -> tuple[list[Message], Message | None, ThreadRecord]: ...
    async def set_state(
        self,
        messages: Sequence[Message],
        state: MessageState,
        fence: Fence,
        error: str | None = None,
    ) -> list[Message]: ...
    async def rewrite_thread(self, thread: ThreadRecord, fence: Fence) -> None: ...
    async def end_thread(
        self, thread: ThreadRecord, status: ThreadStatus, output: str, fence: Fence
    ) -> ThreadRecord: ...
    async def add_outbound(
        self,
        channel: str,
        content: str,
        fence: Fence,
        *,
        metadata: dict[str, Any],
        in_reply_to: str | None = None,
        thread_id: str | None = None,
    ) -> Message: ...
    async def set_remote_id(self, message: Message, remote_id: str, fence: Fence) -> Message: ...
    async def get_session(self, agent: str) -> str | None: ...
    async def clear_session(self, agent: str) -> None: ...
    async def conversation(self, agent: str) -> ThreadRecord | None: ...

    # -- outbox (mirror writes that must not be lost) ------------------------------
    async def outbox_add(self, kind: str, payload: dict[str, Any]) -> int: ...
    async def outbox_items(self) -> list[tuple[int, str, dict[str, Any], int]]: ...
    async def outbox_failed(self, seq: int, error: str) -> None: ...
    async def outbox_done(self, seq: int) -> None: ...
    async def outbox_count(self) -> int: ...

    # -- processes that may outlive a crash ----------------------------------------
    async def add_process(self, record: ProcessRecord) -> None: ...
    async def remove_process(self, record: ProcessRecord) -> None: ...
    async def list_processes(self) -> list[ProcessRecord]: ...
    async def clear_processes(self) -> None: ...

    # -- reading ------------------------------------------------------------------
    async def get_message(self, message_id: str) -> Message | None: ...
    async def list_messages(
        self,
        channel: str,
        *,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        tail: bool = False,
    ) -> Page: ...
    async def count_buffered(self) -> int: ...
    async def list_threads(
        self, channel: str | None = None, limit: int = 500
    ) -> list[ThreadRecord]: ...
    async def answered_by(self, reply_id: str) -> list[Message]: ...
    async def get_thread(self, thread_id: str) -> ThreadRecord | None: ...
