"""Cron and one-shot jobs -> inbound messages, correct by construction.

One Trio task sleeps until the earliest due job (a heap, not a tick), or until
a job changes. At a wake, each due job fires its *latest* slot that is due
(so a daemon that was down fires a missed slot once, not a burst), by posting
an inbound message through the normal durable path. The slot is recorded in
the same transaction as that message, and the message's external id is
``job:<name>:<slot>``, so a slot fires at most once, ever, across restarts.

A job whose previous message (scheduled or run-now) is still buffered, queued
or working skips the slot instead (recorded and counted): no pile-up.

When the store fails (a full disk), a due slot waits until it commits again,
and the jobs are then read again from the store: a job whose create or edit
was lost (a 507) is not kept in memory as if it had been saved.

A one-shot job (``run_at``, mcp.md M28) has one slot, ``run_at``: it fires
once (a missed one at the next start) and then stays listed, disabled.

Slots come from croniter in the job's IANA timezone. Across DST transitions
skydeck fires exactly what croniter yields (see docs/design.md, "Cron").
Wall time comes from a `WallClock`, so tests can run a day of schedule in
milliseconds under Trio's autojump clock.

On several hosts (multi-host.md P17, P23) only the holder of
``role:scheduler`` runs `Scheduler.run`, under that role's `Fence`; every
host keeps the API side (`jobs`, `create`, ...), reading jobs from the store.
A fire or a skip is decided by one fenced insert of the slot's `job_slots`
row, so a paused or replaced holder changes nothing (`FencedOut`) and a
rival finds the slot taken. The clock is the database's (`CorrectedClock`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

import trio
from croniter import croniter

from .errors import Conflict, FencedOut, NotFound, SkydeckError, StoreFailure
from .ledger import OPEN_STATES
from .model import RUN_NOW_PREFIX, Accepted, Inbound, Job
from .store import Fence, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)
#: After a store failure in a fire, wait this long before trying again (a failed
#: read does not move `store.failures`, so nothing else would slow the loop).
FIRE_RETRY_S = 0.5


class WallClock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class CorrectedClock:
    """A host's wall clock moved by ``offset()`` seconds: the database clock
    minus this host's, measured at each heartbeat (P23), so host skew never
    moves a slot."""

    def __init__(self, wall: WallClock, offset: Callable[[], float]) -> None:
        self.wall = wall
        self.offset = offset

    def now(self) -> datetime:
        return self.wall.now() + timedelta(seconds=self.offset())


class TrioWallClock:
    """Wall time that follows Trio's clock: ``epoch`` + Trio seconds (tests, benchmarks)."""

    def __init__(self, epoch: datetime) -> None:
        self.epoch = epoch

    def now(self) -> datetime:
        return self.epoch + timedelta(seconds=trio.current_time())


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def next_slot(job: Job, after: datetime) -> datetime:
    """The first cron slot strictly after ``after``, in UTC."""
    local = after.astimezone(ZoneInfo(job.timezone))
    return croniter(job.schedule, local).get_next(datetime).astimezone(UTC)  # type: ignore[no-any-return]


def latest_slot(job: Job, at: datetime) -> datetime:
    """The last slot at or before ``at``, in UTC (a one-shot's only slot is ``run_at``)."""
    if job.run_at is not None:
        return parse_iso(job.run_at)
    local = at.astimezone(ZoneInfo(job.timezone))
    if croniter.match(job.schedule, local):
        return at.replace(second=0, microsecond=0).astimezone(UTC)
    return croniter(job.schedule, local).get_prev(datetime).astimezone(UTC)  # type: ignore[no-any-return]


def upcoming(job: Job, now: datetime) -> str | None:
    """When an enabled job is due next: its next cron slot, or a one-shot's
    ``run_at`` until that slot has fired (a missed one is due at once, M28; a
    fired one given a new ``run_at`` is due again)."""
    if not job.enabled:
        return None
    if job.run_at is not None:
        return job.run_at if job.last_slot != job.run_at else None
    return iso(next_slot(job, now))


class Intake(Protocol):
    """Where fired messages go (the registry)."""

    async def submit_slot(
        self, inbound: Inbound, fired: Callable[[Accepted], Job], fence: Fence | None = None
    ) -> tuple[Accepted, Job] | None:
        """Store the message and the job as ``fired`` makes it in one write, then
        hand the message on; None: another scheduler took the slot (P23)."""
        ...


class Scheduler:
    def __init__(
        self,
        store: Store,
        intake: Intake,
        clock: WallClock | None = None,
        *,
        on_fire: Callable[[str], None] | None = None,
        shared: bool = False,
    ) -> None:
        """``shared``: other hosts write these jobs too (P22, P23), so the API's
        views read them from the store, and `run` is the role holder's alone."""
        self.store = store
        self.intake = intake
        self.clock = clock or SystemClock()
        self.on_fire = on_fire
        self.shared = shared
        #: The role's fence while `run` fires (None: the only scheduler, SQLite).
        self.fence: Fence | None = None
        self._running = False
        self._reload = False
        self.wakeups = 0
        self._jobs: dict[str, Job] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._changed = trio.Event()
        self._epoch = store.failures  # `Store.failures` when the jobs were read

    async def _load(self, *, save: bool = True) -> None:
        """The jobs as stored, each due at its next slot (only the firing
        scheduler saves one it had to give a first ``next_run_at``)."""
        self._jobs = {job.name: job for job in await self.store.list_jobs()}
        self._heap = []
        now = self.clock.now()
        for job in self._jobs.values():
            if job.next_run_at is None and (due := upcoming(job, now)) is not None:
                job.next_run_at = due
                if save:
                    await self.store.save_job(job)
            self._push(job)

    async def load(self) -> None:
        """Read the jobs for the API side, on a host that does not fire them."""
        await self._load(save=False)

    async def definitions_changed(self) -> None:
        """P22: a job changed on some host. The firing loop re-reads the jobs
        between two fires; elsewhere they are read now."""
        if self._running:
            self._reload = True
            self._changed.set()
            return
        try:
            await self.load()
        except StoreFailure as exc:  # read again at the next change
            log.warning("jobs not read again: the store failed", extra={"reason": exc.reason})

    # -- the task -----------------------------------------------------------------

    async def run(
        self,
        *,
        fence: Fence | None = None,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read the jobs, then fire due jobs and sleep until the next one is due
        or a job changes. The API may use the scheduler once this has started.

        With ``fence`` (the ``role:scheduler`` lease, P23) every fire and skip
        is fenced by it; a stale one raises `FencedOut` out of here."""
        self.fence = fence
        self._running = True
        try:
            await self._load()
            await self._loop(task_status)
        finally:
            # A former tenure unwinding late (its task was stuck in a thread call
            # while the role was lost and taken again) must not clear its
            # successor's fence: that would fire the next slots unfenced.
            if self.fence is fence:
                self._running = False
                self.fence = None

    async def _loop(self, task_status: TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wake_on_recovery)
            task_status.started()
            while True:
                self.wakeups += 1
                if self._epoch != self.store.failures:
                    # Writes were lost (a full disk): memory may hold a job that was
                    # never saved. Fire nothing until the jobs are read again.
                    await self.store.recovered(self._epoch)
                    epoch = self.store.failures
                    with contextlib.suppress(StoreFailure):
                        await self._load()
                        self._epoch = epoch
                    continue
                try:
                    await self._fire_due(self.clock.now())
                except StoreFailure as exc:
                    log.warning("job not fired: the store failed", extra={"reason": exc.reason})
                    await trio.sleep(FIRE_RETRY_S)  # a failing read does not move the epoch
                    continue
                self._changed = trio.Event()
                if self._reload:  # a job changed on some host (P22): read them again
                    self._reload = False
                    with contextlib.suppress(StoreFailure):
                        await self._load()
                    continue
                delay = self._seconds_until_next()
                with trio.move_on_after(delay):
                    await self._changed.wait()

    async def _wake_on_recovery(self) -> None:
        """A store failure while the loop sleeps is noticed once the store is back."""
        seen = self.store.failures
        while True:
            seen = await self.store.recovered(seen)
            self._changed.set()

    def _seconds_until_next(self) -> float:
        while self._heap:
            due, name = self._heap[0]
            job = self._jobs.get(name)
            if job is None or not job.enabled or job.next_run_at != iso(due):
                heapq.heappop(self._heap)  # stale entry: changed or removed since
                continue
            return max((due - self.clock.now()).total_seconds(), 0.0)
        return float("inf")

    async def _fire_due(self, now: datetime) -> None:
        while self._heap and self._heap[0][0] <= now:
            due, name = heapq.heappop(self._heap)
            job = self._jobs.get(name)
            if job is None or not job.enabled or job.next_run_at != iso(due):
                continue
            slot = max(latest_slot(job, now), due)  # a missed burst fires once, the latest
            try:
                await self._fire(job, slot, now)
            except (StoreFailure, FencedOut):
                self._push(job)
                raise
            except SkydeckError as exc:  # e.g. shutting down: the slot fires at next start
                log.warning("job not fired", extra={"job": job.name, "reason": exc.message})
                self._push(job)
                return
            self._push(job)

    @staticmethod
    def _advance(job: Job, now: datetime) -> None:
        """The job after its slot fired or was skipped: stored in that same write."""
        if job.run_at is not None:
            job.enabled = False  # M28: fired once; it stays listed
        job.next_run_at = upcoming(job, now)

    async def _fire(self, job: Job, slot: datetime, now: datetime) -> None:
        """Fire the slot, or skip it; either way one write decides it (P23)."""
        job.last_slot = iso(slot)
        previous = (
            await self.store.get_message(job.last_message_id) if job.last_message_id else None
        )
        if previous is None or previous.state not in OPEN_STATES:
            if await self._post(job, slot=job.last_slot, now=now, fence=self.fence) is None:
                self._advance(job, now)  # fired by another scheduler: only move on
            return
        job.skipped += 1
        job.last_outcome = "skipped: previous run still " + previous.state
        self._advance(job, now)
        if not await self.store.skip_slot(job, self.fence):
            self._taken(job)
            return
        log.warning(
            "job slot skipped",
            extra={"job": job.name, "slot": job.last_slot, "previous": previous.state},
        )
        self._count("skipped")

    def _taken(self, job: Job) -> None:
        """P23: a rival (a paused holder, a takeover) decided this slot first."""
        log.info("job slot already taken", extra={"job": job.name, "slot": job.last_slot})
        self._count("taken")

    async def _post(
        self, job: Job, *, slot: str, now: datetime, fence: Fence | None = None
    ) -> Accepted | None:
        inbound = Inbound(
            channel=job.channel,
            content=job.content,
            external_id=f"job:{job.name}:{slot}",
            metadata={"job": job.name, "slot": slot},
        )
        if job.delegation_depth > 0:  # M28: scheduling cannot reset the depth (M16)
            inbound.metadata["delegation_depth"] = job.delegation_depth

        scheduled = not slot.startswith(RUN_NOW_PREFIX)

        def fired(accepted: Accepted) -> Job:
            job.last_run_at = iso(now)
            job.last_message_id = accepted.id
            job.last_outcome = f"posted ({accepted.state})"
            if scheduled:
                self._advance(job, now)
            return job

        # The slot is fired together with its message, or not at all.
        result = await self.intake.submit_slot(inbound, fired, fence)
        if result is None:
            self._taken(job)
            return None
        accepted, _ = result
        log.info("job fired", extra={"job": job.name, "slot": slot, "message_id": accepted.id})
        self._count("fired")
        return accepted

    def _push(self, job: Job) -> None:
        if job.enabled and job.next_run_at is not None:
            heapq.heappush(self._heap, (parse_iso(job.next_run_at), job.name))

    def _count(self, outcome: str) -> None:
        if self.on_fire is not None:
            self.on_fire(outcome)

    # -- the API side -------------------------------------------------------------

    async def jobs(self) -> list[Job]:
        return [await self._view(job) for _, job in sorted((await self._known()).items())]

    async def get(self, name: str) -> Job:
        job = (await self._known()).get(name)
        if job is None:
            raise NotFound(f"no job named {name!r}", field="name")
        return await self._view(job)

    async def _known(self) -> dict[str, Job]:
        """The jobs as this host should show them: on several hosts the store's,
        since the role holder fires them there (P23); else those in memory."""
        if not self.shared:
            return self._jobs
        return {job.name: job for job in await self.store.list_jobs()}

    async def _view(self, job: Job) -> Job:
        """The job with its last message's current state as the outcome."""
        if job.last_message_id and (job.last_outcome or "").startswith("posted"):
            message = await self.store.get_message(job.last_message_id)
            if message is not None:
                return Job(**{**job.to_json(), "last_outcome": message.state})
        return job

    async def create(self, job: Job) -> Job:
        if job.name in self._jobs:
            raise Conflict(f"a job named {job.name!r} already exists", field="name")
        job.next_run_at = upcoming(job, self.clock.now())
        self._jobs[job.name] = job
        await self.store.save_job(job)
        self._changed_now(job)
        return job

    async def update(self, name: str, changes: dict[str, Any]) -> Job:
        job = (await self._known()).get(name)
        if job is None:
            raise NotFound(f"no job named {name!r}", field="name")
        self._jobs[name] = job
        for key, value in changes.items():
            setattr(job, key, value)
        job.next_run_at = upcoming(job, self.clock.now())
        await self.store.save_job(job)
        self._changed_now(job)
        return await self._view(job)

    async def remove(self, name: str) -> None:
        known = name in await self._known()
        if self._jobs.pop(name, None) is None and not known:
            raise NotFound(f"no job named {name!r}", field="name")
        await self.store.delete_job(name)
        self._changed.set()

    async def run_now(self, name: str) -> Accepted:
        """Fire at once, outside the schedule (counts as the job's previous run)."""
        job = (await self._known()).get(name)
        if job is None:
            raise NotFound(f"no job named {name!r}", field="name")
        now = self.clock.now()
        accepted = await self._post(job, slot=f"{RUN_NOW_PREFIX}{now.isoformat()}", now=now)
        assert accepted is not None  # a run-now's slot is its own instant: never taken
        return accepted

    def _changed_now(self, job: Job) -> None:
        self._push(job)
        self._changed.set()
