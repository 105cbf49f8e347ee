"""Test doubles for the near side (backends, sinks) and a few waiting helpers.

`ScriptBackend` is driven by the prompt itself, so each test states what the
turn does right where it posts the message:

    "sleep:2 hello"    wait 2 s (virtual time under the autojump clock), then reply
    "fail:why"         raise BackendError("why")
    "raise:why"        raise RuntimeError("why")        (R15)
    "hang"             never return
    "empty"            reply ""                         (R19)
    "nosession ..."    reply without echoing a session   (R18)
    anything else      reply "re: <prompt>", echoing the session id
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import trio

from skydeck.backends.base import Backend, Emit
from skydeck.errors import BackendError, DeliveryError
from skydeck.ledger import TERMINAL_STATES
from skydeck.model import (
    AgentSpec,
    Inbound,
    Message,
    ThreadRecord,
    ToolAccess,
    TurnResult,
    TurnSession,
)
from skydeck.pg.cluster import CHANNELS, Cluster
from skydeck.pg.driver import Listener, Timeouts, conninfo
from skydeck.pg.ownership import application_name
from skydeck.registry import Registry, build_registry
from skydeck.store import Fence, Store
from skydeck.store.postgres import PostgresStore
from skydeck.store.sqlite import SQLiteStore
from skydeck.transports.base import Mirror

#: Opens the test's store: the same file or database each time (a "restart");
#: the `open_store` fixture (conftest.py) runs a test on SQLite and on PostgreSQL.
OpenStore = Callable[[], Awaitable[Store]]
#: How often the only host of a PostgreSQL store scans (virtual seconds): wake-ups
#: claim its new channels, and a simulated day of scans would cost real seconds.
ONE_HOST_SCAN_S = 3600.0


@dataclass
class Call:
    channel: str
    prompt: str
    session: TurnSession
    started: float
    ended: float | None = None


@dataclass
class ScriptBackend:
    calls: list[Call] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_overlap: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    running: int = 0
    max_running: int = 0

    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult:
        call = Call(agent.channel, prompt, session, trio.current_time())
        self.calls.append(call)
        self.active[agent.channel] += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.max_overlap[agent.channel] = max(
            self.max_overlap[agent.channel], self.active[agent.channel]
        )
        try:
            return await self._act(prompt, session, emit)
        finally:
            self.active[agent.channel] -= 1
            self.running -= 1
            call.ended = trio.current_time()

    async def _act(self, prompt: str, session: TurnSession, emit: Emit) -> TurnResult:
        emit("init", {"session_id": session.id})
        if m := re.match(r"sleep:([\d.]+) ?", prompt):
            await trio.sleep(float(m.group(1)))
        if prompt.startswith("fail:"):
            raise BackendError(prompt[5:])
        if prompt.startswith("raise:"):
            raise RuntimeError(prompt[6:])
        if prompt == "hang":
            await trio.sleep_forever()
        if prompt == "empty":
            return TurnResult(reply="", session_id=session.id)
        emit("text", {"text": f"re: {prompt}"})
        echoed = None if prompt.startswith("nosession") else session.id
        return TurnResult(reply=f"re: {prompt}", session_id=echoed, usage={"output_tokens": 1})

    def prompts(self, channel: str) -> list[str]:
        return [call.prompt for call in self.calls if call.channel == channel]


@dataclass
class FlakyMirror:
    """A mirror for every channel whose reply writes fail with the given statuses
    first (None = a network error); threads, sessions and callbacks are recorded."""

    failures: list[int | None]
    channels: set[str] | None = None  # None: every channel
    attempts: list[float] = field(default_factory=list)
    delivered: list[Message] = field(default_factory=list)
    threads: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[Message] = field(default_factory=list)
    callbacks: list[Inbound] = field(default_factory=list)

    def serves(self, channel: str) -> bool:
        return self.channels is None or channel in self.channels

    def takes_callbacks(self, channel: str) -> bool:
        return self.serves(channel)

    async def write_reply(self, reply: Message, inbound: Message) -> str:
        self.attempts.append(trio.current_time())
        if self.failures:
            status = self.failures.pop(0)
            raise DeliveryError("vault write failed", status=status)
        self.delivered.append(reply)
        return f"remote-{reply.id}"

    async def write_thread(self, thread: ThreadRecord, phase: str, inbound: Message) -> None:
        self.threads.append((phase, thread.status))

    async def read_session(self, agent: AgentSpec) -> str | None:
        return None

    async def queue_callback(self, callback: Inbound, fence: Fence) -> None:
        self.callbacks.append(callback)

    async def defer_reply(self, reply: Message, thread: ThreadRecord, fence: Fence) -> None:
        self.deferred.append(reply)

    async def clear_session(self, agent: AgentSpec) -> None:
        pass

    async def queue_notify(self, message: Message, fence: Fence) -> None:
        self.deferred.append(message)


def make_store(tmp_path: Path, name: str = "skydeck.db") -> SQLiteStore:
    return SQLiteStore(tmp_path / name)


@asynccontextmanager
async def running_registry(
    store: Store,
    backend: Backend | None = None,
    *,
    mirror: Mirror | None = None,
    agents: Iterable[AgentSpec] = (),
    buffer_cap: int = 1000,
    max_turns: int = 4,
    backends: dict[str, Backend] | None = None,
) -> AsyncIterator[Registry]:
    """A registry serving in its own nursery for the block, then cancelled."""
    shared = isinstance(store, PostgresStore)
    registry = build_registry(
        store,
        {"echo": backend or ScriptBackend(), **(backends or {})},
        mirror=mirror,
        buffer_cap=buffer_cap,
        max_turns=max_turns,
        clustered=shared,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve)
        if shared:
            await nursery.start(one_host(store, registry).run)
        agents = list(agents)
        for agent in agents:
            await registry.create(agent)
        if shared:  # the cluster claims them as the service's does; wait for that
            await owning(registry, [agent.channel for agent in agents])
        yield registry
        nursery.cancel_scope.cancel()


def one_host(store: Store, registry: Registry) -> Cluster:
    """The cluster loops of the only host on a PostgreSQL store, as `PgHost`
    builds them (claims, LISTEN wake-ups), driving ``registry``."""
    assert isinstance(store, PostgresStore)
    ownership = store.ownership
    assert ownership.incarnation is not None
    listener = Listener(
        conninfo(
            store.url,
            application_name=application_name(ownership.host_id, ownership.incarnation),
            schema=store.schema_name,
            timeouts=Timeouts.for_ttl(ownership.ttl_s),
        ),
        CHANNELS,
    )
    return Cluster(store, listener, registry, scan_interval_s=ONE_HOST_SCAN_S, rebalance_s=math.inf)


async def owning(registry: Registry, channels: Iterable[str], timeout: float = 600) -> None:
    """Wait until this host runs every one of ``channels`` (a claim and an adoption)."""
    wanted = set(channels)
    with trio.fail_after(timeout):
        while not wanted <= set(registry.owned()):
            await trio.sleep(0.01)


def agent(name: str, channel: str | None = None, **kwargs: object) -> AgentSpec:
    """An agent on the scripted backend (registered under the name "echo")."""
    return AgentSpec(name=name, channel=channel or name, backend="echo", **kwargs)  # type: ignore[arg-type]


async def post(registry: Registry, channel: str, content: str, **metadata: object) -> str:
    return (
        await registry.submit(Inbound(channel=channel, content=content, metadata=dict(metadata)))
    ).id


def crashed_three_times(store: Store, message_id: str) -> None:
    """Three starts of the message that never ended (three daemon crashes, R28),
    written past the store's operations, as a crash leaves the row."""
    statement = "UPDATE messages SET state = 'working', attempts = 3 WHERE id = %s"
    if isinstance(store, PostgresStore):
        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(f"SET search_path = {store.schema_name}".encode())
            conn.execute(statement.encode(), (message_id,))
        return
    assert isinstance(store, SQLiteStore)
    with store._tx() as db:
        db.execute(statement.replace("%s", "?"), (message_id,))


@dataclass
class ThreadHops:
    """Worker-thread calls finished so far in this test (conftest.py counts them
    on PostgreSQL, where every store operation is one)."""

    finished: int = 0


THREAD_HOPS = ThreadHops()


async def settle(store: Store, ids: Iterable[str], timeout: float = 600) -> list[Message]:
    """Wait until every message is terminal (virtual time under the autojump clock).

    On PostgreSQL a read is a thread hop, and polling every 10 virtual ms through
    a simulated minute would be 6,000 of them: the messages are read again only
    once some other store call has finished (nothing else can change them)."""
    wanted = list(ids)
    shared = isinstance(store, PostgresStore)
    unchanged_at: int | None = None
    with trio.fail_after(timeout):
        while True:
            if unchanged_at is None or THREAD_HOPS.finished != unchanged_at:
                before = THREAD_HOPS.finished
                messages = [await store.get_message(i) for i in wanted]
                if all(m is not None and m.state in TERMINAL_STATES for m in messages):
                    return [m for m in messages if m is not None]
                # Only our own reads finished meanwhile: whatever finishes next is news.
                alone = THREAD_HOPS.finished - before == len(wanted)
                unchanged_at = THREAD_HOPS.finished if shared and alone else None
            await trio.sleep(0.01)


async def reply_of(store: Store, message: Message) -> Message:
    assert message.reply_id is not None, f"{message.id} has no reply"
    reply = await store.get_message(message.reply_id)
    assert reply is not None
    return reply


def namespace_of(pid: int) -> str:
    """``pid:[<inode>]``: the pid namespace ``pid`` lives in (a sandbox has its own)."""
    return os.readlink(f"/proc/{pid}/ns/pid")


def alive_in(namespace: str) -> list[int]:
    """Host pids in ``namespace`` that are not zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[0]
            if state != b"Z" and namespace_of(int(entry)) == namespace:
                found.append(int(entry))
        except OSError:
            continue
    return found
