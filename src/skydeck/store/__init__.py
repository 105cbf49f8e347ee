"""The store seam: what the daemon asks of its system of record.

Three Protocols (multi-host.md §7). `Store`, with the embedded SQLite engine
in `store.sqlite` and the shared PostgreSQL one in `store.postgres`;
`Ownership`, who runs which channel (`store.local.LocalOwnership`: this host
holds every channel, for good; `pg.ownership.PgOwnership`: leases with
fencing tokens); and `Notifier`, the wake-ups between hosts
(`store.local.LocalNotifier` in memory; `pg.notifier.PgNotifier` over
LISTEN/NOTIFY). Every
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

from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from ..errors import FencedOut
from ..ledger import MessageState, ThreadStatus
from ..model import (
    Accepted,
    AgentSpec,
    Inbound,
    Job,
    Message,
    ProcessRecord,
    ThreadRecord,
    TurnEvent,
)

__all__ = [
    "Claimed",
    "Fence",
    "FencedOut",
    "HostInfo",
    "Incarnation",
    "Lease",
    "NotJoined",
    "Notifier",
    "Ownership",
    "Page",
    "Signal",
    "Store",
]

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
        fence: Fence | None = None,
    ) -> tuple[Accepted, Job] | None: ...
    async def skip_slot(self, job: Job, fence: Fence | None = None) -> bool: ...

    # -- inbound ------------------------------------------------------------------
    async def accept_inbound(
        self, inbound: Inbound, *, registered: bool, buffer_cap: int
    ) -> Accepted: ...
    async def accept_batch(
        self, items: Sequence[tuple[Inbound, bool]], *, buffer_cap: int
    ) -> list[Accepted]: ...
    async def claim_open(self, channel: str, fence: Fence) -> list[Message]: ...
    async def release_open(self, channel: str, *, buffer_cap: int) -> int: ...
    async def open_counts(self) -> dict[str, tuple[int, int]]: ...

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
    # A turn's outbox rows are fenced by its channel's lease (P11, PT12); None: a
    # write outside any turn (R27 from the API).
    async def outbox_add(self, kind: str, payload: dict[str, Any], fence: Fence | None) -> int: ...
    async def outbox_items(self) -> list[tuple[int, str, dict[str, Any], int]]: ...
    # Delivering is fenced by the role `role:vault-outbox` (P17): one deliverer.
    async def outbox_failed(self, seq: int, error: str, fence: Fence) -> None: ...
    async def outbox_done(self, seq: int, fence: Fence) -> None: ...
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


# -- who runs which channel (multi-host.md §3) -----------------------------------------

ClaimReason = Literal["unowned", "orphan", "released"]


class NotJoined(Exception):
    """An operation that needs a live incarnation, before `join` (or after `leave`)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this host holds: the channel (or ``role:<r>``) and its token."""

    name: str
    token: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """One lease a claim took, and from whom (P15 names the old owner)."""

    lease: Lease
    reason: ClaimReason
    previous_owner: str | None
    previous_incarnation: int | None


@dataclass(frozen=True, slots=True)
class HostInfo:
    """A host as `/api/cluster` shows it (P28)."""

    id: str
    incarnation: int
    url: str | None
    alive: bool
    owned: int
    heartbeat_age_s: float
    version: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "incarnation": self.incarnation,
            "url": self.url,
            "alive": self.alive,
            "owned": self.owned,
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "version": self.version,
        }


class Incarnation(NamedTuple):
    """One life of a host id (P3): a tuple, so it compares equal to ``(host, n)``."""

    host: str
    incarnation: int


class Ownership(Protocol):
    """This host's identity and the channels it runs (P3, P8-P10, P16).

    A channel's writes are fenced by the token its claim returned (`Fence`).
    A host that cannot renew in time stops by itself at `deadline()` (P10).
    """

    host_id: str
    #: The live incarnation, or None before `join` and after `leave`.
    incarnation: int | None

    async def join(self) -> int:
        """Become a new incarnation of this host (P3); returns it."""
        ...

    async def heartbeat(self) -> bool:
        """Renew every lease at once (P8). False: this incarnation is over (P10)."""
        ...

    async def claim(self, room: int, wanted: Sequence[str] | None = None) -> list[Claimed]:
        """Take up to ``room`` channels that have an agent and no live owner
        (only ``wanted`` ones, if given), each under a new token; never waits (P9)."""
        ...

    async def release(self, names: Sequence[str]) -> int:
        """Give these leases up (tokens stay, so the next claim's is higher); how many."""
        ...

    async def leave(self) -> None:
        """P14's last step: release every lease and end this incarnation."""
        ...

    def deadline(self) -> float:
        """P10: the `time.monotonic` time past which this host must not write as owner."""
        ...

    async def hosts(self) -> list[HostInfo]:
        """Every host the store knows, alive or not (P28)."""
        ...

    async def expire_dead(self) -> list[Incarnation]:
        """P16: end the incarnations found crashed; returns them."""
        ...


# -- wake-ups between hosts (multi-host.md §4, §5) ------------------------------------

SignalKind = Literal["wake", "defs", "lease", "watch", "event"]


@dataclass(frozen=True, slots=True)
class Signal:
    """What `Notifier.listen` hands on.

    - ``wake``: a message for channel ``name`` was stored (P19).
    - ``defs``: definitions changed (``name`` is ``agent:<n>`` or ``job:<n>``, P22).
    - ``lease``: leases may be claimable (a release; ``name`` the host, or ``""``
      when notifications may have been missed, P12): scan now.
    - ``watch``: channel ``name`` gained a viewer on some host (P25).
    - ``event``: ``event`` of channel ``name``, relayed by its owner under
      ``token`` (a receiver drops tokens below the highest seen, P25).
    """

    kind: SignalKind
    name: str = ""
    event: TurnEvent | None = None
    token: int = 0


class Notifier(Protocol):
    """Signals between the hosts of one store. Each notifier has one listener."""

    async def wake(self, channel: str) -> None:
        """Tell the channel's owner to read its open messages (joins the next batch)."""
        ...

    def listen(self) -> AsyncGenerator[Signal, None]:
        """The signals, in the order they were committed, until cancelled."""
        ...

    async def watch(self, channel: str) -> None:
        """A viewer here wants ``channel``'s events, wherever it runs (P25)."""
        ...

    async def relay(self, channel: str, event: TurnEvent, fence: Fence) -> None:
        """The owner's ``event`` for the watchers of ``channel``, under ``fence`` (P25)."""
        ...
