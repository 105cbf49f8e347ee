"""Cluster roles (multi-host.md P17): a task runs on the one host holding its role.

A role is a lease like a channel's (``role:scheduler``, ``role:vault-sync``,
``role:vault-outbox``; R1 names hold no ``:``), claimed by any live host when
it has no valid owner (`Cluster._claim_roles`), and gone with the incarnation
that held it (P10) or released on a graceful stop (P14). `Roles` keeps the
tasks in step with what the cluster holds: `held` is told the roles after
every change, starts the task of each role gained, under the role's `Fence`,
and cancels the task of each role lost. A task's fenced writes (the
scheduler's slots, P23) raise `FencedOut` once the token is stale; the task
then ends and waits for the cluster to notice the loss.

`attach` names the tasks of a daemon: the cron scheduler (P23), and with a
vault the definition poller and the ordered outbox deliverer. Each host adds
to the outbox (its turns' mirror writes); only the holder delivers, so it
also looks every `OUTBOX_POLL_S`, since another host's addition wakes only
that host.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import FencedOut, StoreFailure
from ..store import Fence
from .ownership import ROLE_PREFIX

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..definitions import VaultSync
    from ..scheduler import Scheduler
    from ..transports.vault import VaultMirror
    from .cluster import Cluster

log = logging.getLogger(__name__)

SCHEDULER = f"{ROLE_PREFIX}scheduler"
VAULT_SYNC = f"{ROLE_PREFIX}vault-sync"
VAULT_OUTBOX = f"{ROLE_PREFIX}vault-outbox"

#: How often the outbox's holder looks for items other hosts added.
OUTBOX_POLL_S = 5.0
#: A role task that failed with the store starts again after this.
RETRY_S = 1.0

RoleTask = Callable[[Fence], Awaitable[None]]


@dataclass(slots=True)
class _Running:
    fence: Fence
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Roles:
    """Runs each role's task while this host holds the role (see the module docstring)."""

    def __init__(self, tasks: Mapping[str, RoleTask]) -> None:
        self.tasks = dict(tasks)
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self._pending: dict[str, Fence] = {}

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the role tasks; cancel this to stop them all."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            self.held(self._pending)  # roles taken before this ran
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def held(self, roles: Mapping[str, Fence]) -> None:
        """The roles this host holds now: a task whose role is gone (or held
        under another token) is cancelled; a role gained starts its task.

        Nothing waits for a cancelled task: a write of its still in flight
        holds the lease row (P11's ``FOR SHARE``), so whatever takes the role
        next commits after it, and a later write is `FencedOut`."""
        self._pending = dict(roles)
        for name, run in list(self._running.items()):
            if roles.get(name) != run.fence:
                run.scope.cancel()
                del self._running[name]
                log.info("role task stopped", extra={"role": name, "token": run.fence.token})
        if self._nursery is None:
            return
        for name, fence in roles.items():
            task = self.tasks.get(name)
            if task is None or name in self._running:
                continue
            run = _Running(fence)
            self._running[name] = run
            self._nursery.start_soon(self._run, name, task, run, name=f"role {name}")

    async def _run(self, name: str, task: RoleTask, run: _Running) -> None:
        """The task, again after a store failure (a role can be taken just as the
        store flaps, e.g. at a rejoin), until it ends, is fenced or cancelled."""
        log.info("role task started", extra={"role": name, "token": run.fence.token})
        with run.scope:
            while True:
                fenced, failure = False, ""
                try:
                    await task(run.fence)
                    return
                except* FencedOut:  # from inside the task's own nursery, as a group
                    fenced = True
                except* StoreFailure as failed:
                    failure = str(failed.exceptions[0])
                if fenced:
                    # Another host holds the role now; this one learns at its next
                    # heartbeat (P10). Until the fence changes the task stays stopped.
                    log.warning("role fenced", extra={"role": name, "token": run.fence.token})
                    return
                log.warning(
                    "role task failed: the store failed; retrying",
                    extra={"role": name, "reason": failure},
                )
                await trio.sleep(RETRY_S)


def attach(
    cluster: Cluster,
    scheduler: Scheduler,
    vault: VaultMirror | None = None,
    sync: VaultSync | None = None,
) -> Roles:
    """The role tasks of a daemon, driven by ``cluster``'s roles; run the result."""

    async def schedule(fence: Fence) -> None:
        await scheduler.run(fence=fence)

    tasks: dict[str, RoleTask] = {SCHEDULER: schedule}
    if vault is not None and sync is not None:

        async def poll_vault(fence: Fence) -> None:
            await sync.run()

        async def deliver(fence: Fence) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vault.run_outbox, fence)
                while True:
                    await trio.sleep(OUTBOX_POLL_S)
                    vault.wake()

        tasks |= {VAULT_SYNC: poll_vault, VAULT_OUTBOX: deliver}
    roles = Roles(tasks)
    cluster.on_roles = roles.held
    cluster.on_definitions.append(scheduler.definitions_changed)
    return roles
