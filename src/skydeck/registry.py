"""Channel -> task. Every registered channel has exactly one Trio task reading
its own memory channel, so one channel's turns can never overlap (R6) and
different channels never wait for each other (except for the global turn
limit, R10).

Registrations, posts and removals await the store, and the embedded store's
operations never checkpoint: accepting a message, deciding `queued` versus
`buffered` and handing it to the channel task happen without a checkpoint in
between, so no registration can slip in between the decision and the row that
records it. (A store shared by several hosts decides `queued` versus
`buffered` by itself, multi-host.md P13.)

When the store loses writes (a full disk: `Store.failures` moves), what the
registry holds in memory may be ahead of the store: a queued message whose row
was rolled back, an agent whose row never landed. The rule: memory is read
again from the store once it commits again. Every channel task replaces its
queue with the channel's open messages as stored (`_reload`), before it starts
another turn; a turn never starts on messages read before the failure
(`Turn` checks); and the agents are made to match the stored ones (`_resync`).
That is a restart's R28 replay, done in place, so it is exactly as correct.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from .backends.base import release_agent
from .errors import Conflict, FencedOut, NotFound, Stale, StoreFailure, Unavailable
from .events import TurnEvents
from .ledger import AgentStatus, MessageState
from .model import Accepted, AgentSpec, EventKind, Inbound, Job, Message, TurnEvent
from .store import Fence, Store
from .turn import MAX_ATTEMPTS, ToolGate, Turn, TurnDeps

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from .backends.base import Backend
    from .metrics import Metrics
    from .transports.base import Mirror

log = logging.getLogger(__name__)

#: How a registration takes its channel's open messages, under the channel's fence.
Claim = Callable[[Fence], Awaitable[list[Message]]]

DEFAULT_BUFFER_CAP = 1000
DEFAULT_MAX_TURNS = 4
REMOVED_REASON = "agent removed"
RESET_REASON = "the conversation was reset"
INTERRUPTED_REASON = "interrupted by a newer message"


def turn_batches(messages: list[Message]) -> list[list[Message]]:
    """The turns a channel task's batch runs as, in order.

    A message a restart interrupted `MAX_ATTEMPTS` times is failed on its own
    (R28), never joined with the messages a `collect` agent gathered behind it:
    they still run, as one turn of their own.
    """
    exhausted = [[m] for m in messages if m.attempts >= MAX_ATTEMPTS]
    rest = [m for m in messages if m.attempts < MAX_ATTEMPTS]
    return exhausted + ([rest] if rest else [])


@dataclass(eq=False)
class ChannelTask:
    """The state the registry keeps for one registered channel."""

    agent: AgentSpec
    send: trio.MemorySendChannel[Message]
    receive: trio.MemoryReceiveChannel[Message]
    #: Carried by every write the channel's turns make.
    fence: Fence
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    turn: Turn | None = None
    waiting_for_slot: bool = False
    #: `Store.failures` when the queue was last read from the store.
    epoch: int = 0
    #: Messages taken off the queue, not yet finished (waiting for a slot or in a turn).
    holding: bool = False
    #: Ids of the open messages handed to this task (several hosts only): a wake-up
    #: (P19) reads the channel's open messages by state and hands on only the others.
    known: set[str] = field(default_factory=set)
    #: A wake-up is reading the store now; another one asked meanwhile reads again after.
    waking: bool = False
    wake_again: bool = False

    @property
    def backlog(self) -> int:
        return self.send.statistics().current_buffer_used

    def status(self) -> tuple[AgentStatus, int]:
        """R5 (and R10: a message waiting for a global slot counts as queued)."""
        waiting = self.backlog + (1 if self.waiting_for_slot else 0)
        if waiting:
            return AgentStatus.QUEUED, waiting
        return (AgentStatus.IDLE if self.turn is None else AgentStatus.WORKING), 0


class Registry:
    def __init__(
        self,
        store: Store,
        deps: TurnDeps,
        *,
        buffer_cap: int = DEFAULT_BUFFER_CAP,
        max_turns: int = DEFAULT_MAX_TURNS,
        on_accepted: Callable[[Accepted], None] | None = None,
        clustered: bool = False,
    ) -> None:
        """``clustered``: the store is shared by several hosts (multi-host.md §7):
        a channel task runs only for a channel this host holds the lease of
        (`adopt`), and the other agents are known but run elsewhere."""
        self.store = store
        self.clustered = clustered
        #: Agents whose channel another host runs (``clustered`` only).
        self._remote: dict[str, AgentSpec] = {}
        #: Their channels' (working, queued) messages as last read (P24).
        self._remote_counts: dict[str, tuple[int, int]] = {}
        self.deps = deps
        self.events: TurnEvents = deps.events
        self.buffer_cap = buffer_cap
        self.limiter = trio.CapacityLimiter(max_turns)
        self.accepting = True
        self.on_accepted = on_accepted
        self._stopping = False
        self._running = 0
        self._idle = trio.Event()
        self._by_name: dict[str, ChannelTask] = {}
        self._by_channel: dict[str, ChannelTask] = {}
        #: Channels being deregistered, while their running turn is cancelled: its
        #: last events (`error agent removed`) are still this host's to relay (P25).
        self._leaving: dict[str, Fence] = {}
        self._nursery: trio.Nursery | None = None

    # -- lifetime -----------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the channel tasks. Stored agents register at once, replaying their
        open messages in order (R28); cancel this to stop them all (their state
        stays in the store for the next start)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.store.run_flusher, name="store-flusher")
            for agent in await self.store.list_agents():
                if self.clustered:
                    self._remote[agent.name] = agent  # run here once adopted
                else:
                    await self._register(agent)
            nursery.start_soon(self._resync_after_failures, name="store-resync")
            task_status.started()
            await trio.sleep_forever()

    async def drain(self, grace_s: float) -> None:
        """R29: take no new messages, start no new turn, give running turns
        ``grace_s`` to finish. The caller cancels what is left; those messages
        stay `working`/`queued` in the store and run again at next start."""
        self.accepting = False
        self._stopping = True
        if self._running:
            self._idle = trio.Event()
            with trio.move_on_after(grace_s):
                await self._idle.wait()
        log.info("drained", extra={"turns_left": self._running})

    def depths(self) -> list[tuple[str, int]]:
        """Queue depth per agent, for metrics."""
        return [(name, task.status()[1]) for name, task in sorted(self._by_name.items())]

    # -- agents -------------------------------------------------------------------

    def agents(self) -> list[AgentSpec]:
        local = [task.agent for task in self._by_name.values()]
        return sorted([*local, *self._remote.values()], key=lambda agent: agent.name)

    def get(self, name: str) -> AgentSpec:
        task = self._by_name.get(name)
        if task is not None:
            return task.agent
        if name in self._remote:
            return self._remote[name]
        raise NotFound(f"no agent named {name!r}", field="name")

    def status(self, name: str) -> tuple[AgentStatus, int]:
        """R5. A channel run on another host (P24) as `refresh_status` last read
        it from the store: queued N while N messages are queued, else working
        while one is; so every host shows a busy channel alike."""
        task = self._by_name.get(name)
        if task is not None:
            return task.status()
        remote = self._remote.get(name)
        working, queued = self._remote_counts.get(remote.channel, (0, 0)) if remote else (0, 0)
        if queued:
            return AgentStatus.QUEUED, queued
        return (AgentStatus.WORKING if working else AgentStatus.IDLE), 0

    async def refresh_status(self) -> None:
        """Read the open messages of channels run elsewhere (P24), for `status`;
        one query, before a listing of agents. A store that does not answer
        leaves the last counts (`/health` says the store is unreachable, P6)."""
        if self._remote:
            with contextlib.suppress(StoreFailure):
                self._remote_counts = await self.store.open_counts()

    async def create(self, agent: AgentSpec) -> AgentSpec:
        if agent.name in self._by_name or agent.name in self._remote:
            raise Conflict(f"an agent named {agent.name!r} already exists", field="name")
        self._check_channel_free(agent.channel)
        if self.clustered:
            # The store decides between hosts (R2 as unique constraints, P22); the
            # channel runs wherever its lease is claimed, this host included.
            await self.store.create_agent(agent, Fence.local(agent.channel))
            self._remote[agent.name] = agent
            return agent
        # One write: a failed claim of its buffered messages undoes the row.
        await self._register(agent, lambda fence: self.store.create_agent(agent, fence))
        return agent

    async def update(self, name: str, changes: dict[str, Any]) -> AgentSpec:
        """PATCH: other fields apply from the next turn; a new channel moves the agent (R3)."""
        current = self.get(name)
        updated = replace(current, **changes)
        moved = updated.channel != current.channel
        if moved:
            self._check_channel_free(updated.channel)
        await self.store.save_agent(updated)
        if name in self._remote or (self.clustered and moved):
            # Its owner applies it (P22); a moved one is claimed again under a new token.
            if name in self._by_name:
                await self.abandon([current.channel], "agent moved")
            self._remote[name] = updated
        elif moved:
            await self._deregister(name)
            await self._register(updated)
        else:
            self._by_name[name].agent = updated
        return updated

    async def remove(self, name: str) -> None:
        """R26: cancel the channel's task and forget the agent (404 when unknown)."""
        self.get(name)
        if name in self._remote:  # its owner cancels the running turn when told (P22)
            del self._remote[name]
        else:
            await self._deregister(name)
        await self.store.delete_agent(name)

    async def reset(self, name: str) -> None:
        """R27: the next turn of a single-threaded agent starts a fresh conversation."""
        agent = self.get(name)
        await self.store.clear_session(name)
        release_agent(self.deps.backends, name, RESET_REASON)  # W13
        mirror = self.deps.mirror
        if mirror is not None and mirror.serves(agent.channel):
            await mirror.clear_session(agent)

    def _check_channel_free(self, channel: str) -> None:
        holder = self._by_channel.get(channel)
        name = holder.agent.name if holder is not None else None
        if name is None:
            name = next((a.name for a in self._remote.values() if a.channel == channel), None)
        if name is not None:
            raise Conflict(
                f"channel {channel!r} is already served by agent {name!r}", field="channel"
            )

    # -- messages -----------------------------------------------------------------

    async def submit(self, inbound: Inbound) -> Accepted:
        """Store the message (durable at the next `flushed()`), then hand it to
        its channel task (if any)."""
        self._check_accepting()
        accepted = await self.store.accept_inbound(
            inbound, registered=self._registered(inbound.channel), buffer_cap=self.buffer_cap
        )
        await self._dispatch(accepted)
        return accepted

    async def submit_batch(self, inbounds: Sequence[Inbound]) -> list[Accepted]:
        """`submit` for many messages in one store write: all of them land, or
        (a store failure) none does, and none reaches a channel task then."""
        self._check_accepting()
        accepted = await self.store.accept_batch(
            [(inbound, self._registered(inbound.channel)) for inbound in inbounds],
            buffer_cap=self.buffer_cap,
        )
        for one in accepted:
            await self._dispatch(one)
        return accepted

    async def submit_slot(
        self, inbound: Inbound, fired: Callable[[Accepted], Job], fence: Fence | None = None
    ) -> tuple[Accepted, Job] | None:
        """A cron slot's message and its job (as ``fired`` makes it) in one write;
        only then is the message handed on (nothing a rollback took back runs).
        None: another scheduler took the slot (``fence``: the role's, P23)."""
        self._check_accepting()
        result = await self.store.fire_slot(
            inbound,
            registered=self._registered(inbound.channel),
            buffer_cap=self.buffer_cap,
            fired=fired,
            fence=fence,
        )
        if result is not None:
            await self._dispatch(result[0])
        return result

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("skydeck is shutting down; try again after it restarts")

    def _registered(self, channel: str) -> bool:
        return channel in self._by_channel

    async def _dispatch(self, accepted: Accepted) -> None:
        """What follows a stored message: hand a queued one to its channel task,
        interrupt (R9), the `queued` event, metrics."""
        task = self._by_channel.get(accepted.message.channel)
        if accepted.state is MessageState.QUEUED and task is not None:
            if self.clustered:
                # P20: an earlier message stored on another host may not have
                # reached this task yet; reading by state keeps seq order.
                await self.wake(task.agent.channel)
            else:
                task.known.add(accepted.id)
                task.send.send_nowait(accepted.message)
                if task.agent.queue_mode == "interrupt" and task.turn is not None:
                    await task.turn.cancel(INTERRUPTED_REASON)  # R9: the newest message wins
                self._queued(task.agent.channel, accepted.id)
        if self.on_accepted is not None:
            self.on_accepted(accepted)

    def _queued(self, channel: str, message_id: str) -> None:
        """The `queued` event. On a cluster the owner says it as its task learns of
        the message (`wake`), wherever it was posted (P25)."""
        try:
            self.events.publish(channel, TurnEvent(kind=EventKind.QUEUED, message_id=message_id))
        except Exception:  # R25: a viewer's failure is never the sender's
            log.exception("queued event failed", extra={"channel": channel})

    def stop_accepting(self) -> None:
        """R29's first step: from now on every post is a 503 and stores nothing."""
        self.accepting = False

    # -- channel tasks ------------------------------------------------------------

    async def _register(
        self, agent: AgentSpec, claim: Claim | None = None, fence: Fence | None = None
    ) -> None:
        """Start the channel's task and feed it the channel's open messages (R7, R28),
        as ``claim`` takes them (by default `Store.claim_open`), under ``fence``
        (by default the embedded store's)."""
        assert self._nursery is not None, "Registry.serve() is not running"
        send, receive = trio.open_memory_channel[Message](math.inf)
        task = ChannelTask(
            agent=agent, send=send, receive=receive, fence=fence or Fence.local(agent.channel)
        )
        await self._reload(task, claim)  # first: if the store fails here, nothing is registered
        self._by_name[agent.name] = task
        self._by_channel[agent.channel] = task
        self._nursery.start_soon(self._run_channel, task, name=f"channel:{agent.channel}")

    async def _reload(self, task: ChannelTask, claim: Claim | None = None) -> None:
        """Make the task's queue the channel's open messages as stored, oldest first."""
        epoch = self.store.failures
        if claim is None:
            messages = await self.store.claim_open(task.agent.channel, task.fence)
        else:
            messages = await claim(task.fence)
        self._drain_nowait(task.receive)
        for message in messages:
            task.send.send_nowait(message)
        if self.clustered:
            task.known |= {message.id for message in messages}
        task.epoch = epoch

    async def _resync_after_failures(self) -> None:
        """Each time the store commits again after a failure, make memory match it."""
        seen = self.store.failures
        while True:
            seen = await self.store.recovered(seen)
            if self._stopping:
                return  # the next start reads everything from the store anyway
            try:
                await self._resync()
            except StoreFailure:
                continue  # failed again: the next recovery tries again
            log.info("registry re-read from the store", extra={"agents": len(self._by_name)})

    async def _resync(self) -> None:
        """The agents as stored; the queue of every task not holding messages as
        stored (a task holding some reloads itself when it is done with them)."""
        stored = {agent.name: agent for agent in await self.store.list_agents()}
        if self.clustered:
            self._remote = {n: a for n, a in stored.items() if n not in self._by_name}
            stored = {n: a for n, a in stored.items() if n in self._by_name}
        for name, task in list(self._by_name.items()):
            agent = stored.get(name)
            if agent is None or agent.channel != task.agent.channel:
                await self._deregister(name)
            else:
                task.agent = agent
        for name, agent in stored.items():
            if name not in self._by_name:
                await self._register(agent)
        for task in list(self._by_name.values()):
            if not task.holding and task.epoch != self.store.failures:
                try:
                    await self._reload(task)
                except FencedOut:  # the lease went meanwhile (several hosts)
                    await self.abandon([task.agent.channel], "write fenced")

    async def _deregister(self, name: str) -> None:
        """R26: cancel the running turn (recorded `cancelled`), stop the task, and
        put the channel's queued messages back to `buffered`."""
        task = self._by_name.pop(name)
        del self._by_channel[task.agent.channel]
        if task.turn is not None:
            self._leaving[task.agent.channel] = task.fence
            try:
                await task.turn.cancel(REMOVED_REASON)
            finally:
                del self._leaving[task.agent.channel]
        task.scope.cancel()
        task.send.close()
        release_agent(self.deps.backends, name, REMOVED_REASON)  # W15
        released = await self.store.release_open(task.agent.channel, buffer_cap=self.buffer_cap)
        log.info(
            "agent deregistered",
            extra={"agent": name, "channel": task.agent.channel, "released": released},
        )

    async def _run_channel(self, task: ChannelTask) -> None:
        with task.scope:
            async for message in task.receive:
                task.holding = True
                batch = [message]
                if task.agent.queue_mode == "collect":
                    batch.extend(self._drain_nowait(task.receive))
                for turn_batch in turn_batches(batch):
                    await self._run_turn(task, turn_batch)
                task.holding = False
                while task.epoch != self.store.failures:
                    # Writes were lost since the queue was read: once the store
                    # commits again, the queue is read again (this turn's messages
                    # included, if their end was lost).
                    await self.store.recovered(task.epoch)
                    if task.epoch != self.store.failures:  # not already done by _resync
                        try:
                            await self._reload(task)
                        except StoreFailure:
                            pass
                        except FencedOut:  # the lease went meanwhile (several hosts)
                            await self.abandon([task.agent.channel], "write fenced")

    async def _run_turn(self, task: ChannelTask, batch: list[Message]) -> None:
        task.waiting_for_slot = True
        async with self.limiter:
            task.waiting_for_slot = False
            if self._stopping:
                await trio.sleep_forever()  # R29: no new turn; it replays at start
            task.turn = Turn(
                self.deps,
                task.agent,
                batch,
                epoch=task.epoch,
                fence=task.fence,
                submit=self.submit,
            )
            self._running += 1
            try:
                await task.turn.run()
            except StoreFailure:
                pass  # the turn stopped where its writes were lost; replayed by the caller
            except Stale:
                pass  # its messages ended or moved on elsewhere; the channel goes on
            except FencedOut:
                # Another host holds the channel now (P11): this task must not go on.
                log.warning("turn stopped: write fenced", extra={"channel": task.agent.channel})
                await self.abandon([task.agent.channel], "write fenced")
            except Exception:
                # R25: a bug in a side effect never kills the channel.
                log.exception("turn crashed", extra={"channel": task.agent.channel})
            finally:
                task.turn = None
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

    # -- a cluster's channels (pg.cluster.ChannelHost; ``clustered`` only) -----------

    def owned(self) -> dict[str, Fence]:
        """Channel -> the fence its task holds: what this host runs (a channel
        whose running turn is being cancelled by its removal included)."""
        return {
            **self._leaving,
            **{channel: task.fence for channel, task in self._by_channel.items()},
        }

    async def adopt(self, channel: str, fence: Fence, interrupted_by: str | None = None) -> None:
        """This host just claimed ``channel``: run its task under ``fence``,
        replaying its open messages in seq order (R28, P15).

        ``interrupted_by``: the host that died owning it. Each `working` message
        it left is announced before it reruns (`error`, ``retrying: true``), so a
        viewer closes the partial reply and keeps waiting for the rerun's end.
        """
        agent = next((a for a in self._remote.values() if a.channel == channel), None)
        if agent is None:  # created on another host a moment ago
            stored = await self.store.list_agents()
            agent = next((a for a in stored if a.channel == channel), None)
        if agent is None or channel in self._by_channel:
            return
        self._remote.pop(agent.name, None)
        replayed: list[Message] = []

        async def claim(fence: Fence) -> list[Message]:
            messages = await self.store.claim_open(channel, fence)
            # One at MAX_ATTEMPTS is failed unrun (R28): it is not "running again".
            replayed.extend(
                m for m in messages if m.state is MessageState.WORKING and m.attempts < MAX_ATTEMPTS
            )
            return messages

        await self._register(agent, claim, fence=fence)
        # No checkpoint since the task was started: these come before its first event.
        if interrupted_by is not None:
            for message in replayed:
                self._publish_retrying(channel, message, interrupted_by)

    def _publish_retrying(self, channel: str, message: Message, host: str) -> None:
        error = f"interrupted: host {host} stopped; running it again"
        event = TurnEvent(EventKind.ERROR, message.id, {"error": error, "retrying": True})
        try:
            self.events.publish(channel, event)
        except Exception:  # R25: a viewer's failure is never the turn's
            log.exception("retrying event failed", extra={"channel": channel})

    async def wake(self, channel: str) -> None:
        """P19: a message for this channel was stored elsewhere. Its open messages
        are read by state, never by a seq high-water mark (a lower seq can commit
        later); the task gets those it does not have yet, in seq order."""
        task = self._by_channel.get(channel)
        if task is None:
            return
        if task.waking:  # one read at a time per channel; the one running reads again
            task.wake_again = True
            return
        task.waking = True
        try:
            while True:
                task.wake_again = False
                try:
                    messages = await self.store.claim_open(channel, task.fence)
                except (StoreFailure, FencedOut):
                    return  # the store's recovery, or the lease's loss, deals with it
                if self._by_channel.get(channel) is not task:
                    return
                fresh = [m for m in messages if m.id not in task.known]
                for message in fresh:
                    task.send.send_nowait(message)
                    self._queued(channel, message.id)
                # Only open messages can come back in a later read: the rest is forgotten.
                task.known = {m.id for m in messages}
                if fresh and task.agent.queue_mode == "interrupt" and task.turn is not None:
                    await task.turn.cancel(INTERRUPTED_REASON)
                if not task.wake_again:
                    return
        finally:
            task.waking = False

    async def abandon(self, channels: Sequence[str], reason: str) -> None:
        """Stop these channel tasks as R29's forced stop does: running turns are
        cancelled unrecorded (their messages stay `working` for the next owner)."""
        for channel in channels:
            task = self._by_channel.pop(channel, None)
            if task is None:
                continue
            del self._by_name[task.agent.name]
            self._remote[task.agent.name] = task.agent
            task.scope.cancel()
            task.send.close()
            log.info("channel given up", extra={"channel": channel, "reason": reason})

    def idle_movable(self, shared: bool) -> list[str]:
        """Owned channels with nothing running or queued that may move, for
        rebalancing (P13): a command or claude workspace is a local directory,
        so only echo channels move unless workspaces are ``shared``."""
        return [
            channel
            for channel, task in self._by_channel.items()
            if task.turn is None and not task.backlog and (shared or task.agent.backend == "echo")
        ]

    def idle(self) -> list[str]:
        """Owned channels with no turn running and nothing queued in memory."""
        return [
            channel
            for channel, task in self._by_channel.items()
            if task.turn is None and not task.backlog and not task.holding and not task.waking
        ]

    async def definitions_changed(self) -> None:
        """P22: agents as stored. An owned agent that is gone is deregistered here
        (its running turn cancelled, `agent removed`); a changed one applies from
        its next turn; the others are known as remote."""
        stored = {agent.name: agent for agent in await self.store.list_agents()}
        for name, task in list(self._by_name.items()):
            agent = stored.get(name)
            if agent is None:
                await self._deregister(name)
            elif agent.channel != task.agent.channel:
                await self.abandon([task.agent.channel], "agent moved")
            else:
                task.agent = agent
        self._remote = {n: a for n, a in stored.items() if n not in self._by_name}

    @staticmethod
    def _drain_nowait(receive: trio.MemoryReceiveChannel[Message]) -> list[Message]:
        more: list[Message] = []
        while True:
            try:
                more.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return more


def build_registry(
    store: Store,
    backends: Mapping[str, Backend],
    *,
    events: TurnEvents | None = None,
    mirror: Mirror | None = None,
    metrics: Metrics | None = None,
    on_finished: Callable[[str, MessageState, float, int], None] | None = None,
    buffer_cap: int = DEFAULT_BUFFER_CAP,
    max_turns: int = DEFAULT_MAX_TURNS,
    clustered: bool = False,
    sandbox_mode: Callable[[AgentSpec], str] | None = None,
    tools: ToolGate | None = None,
) -> Registry:
    """A registry and what its turns need, wired once and never re-wired.

    The one way the service, the tests and the benchmarks build a registry, so
    none of them can forget a part (or set one after the fact). ``on_finished``
    (a benchmark's counter) stands in for ``metrics``'s when there is none.
    """
    if metrics is not None:
        on_finished = metrics.on_finished
    deps = TurnDeps(
        store=store,
        events=events or TurnEvents(),
        backends=backends,
        mirror=mirror,
        on_finished=on_finished,
        on_outbound_retry=metrics.outbound_retries.inc if metrics is not None else None,
        sandbox_mode=sandbox_mode,
        tools=tools,
    )
    return Registry(
        store,
        deps,
        buffer_cap=buffer_cap,
        max_turns=max_turns,
        on_accepted=metrics.on_accepted if metrics is not None else None,
        clustered=clustered,
    )
