"""Who runs which channel: host rows, leases and fencing tokens (multi-host.md §3).

Liveness is a row, not a lock (P8): a host is alive while its `hosts` row is
unexpired **on the database clock**; host clocks are never compared. Expiry
lives on the host row, so one heartbeat renews every lease the host holds.
A lease (`leases` row) names its owner by (host, incarnation); it is valid
while that incarnation is alive. Every claim takes a fresh token from
`fence_seq`, so a channel's tokens only grow, and every write a turn makes
is checked against the token it was started under (P11, in the store).

Why not session advisory locks (§0): a SIGSTOPped holder keeps one for as long
as the kernel answers keepalives for it, and nothing tells a holder it lost
one. Here a paused host finds out by itself (P10): its local deadline (the
monotonic time its last successful heartbeat was *sent*, plus the TTL, minus a
margin) passes before the database's (counted from the later receipt), so
it always gives up first; and if it misses that, its writes are fenced.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from ..ledger import MessageState, ThreadStatus, sql_state, sql_states

# The records moved to the seam (§7); importing them from here still works.
from ..store import Claimed as Claimed
from ..store import ClaimReason, Incarnation
from ..store import HostInfo as HostInfo
from ..store import Lease as Lease
from ..store import NotJoined as NotJoined
from .driver import Connection, Session

log = logging.getLogger(__name__)

#: Lease names of the cluster's roles (P17): R1 names cannot contain `:`.
ROLE_PREFIX = "role:"
#: P16: a live host row with no session is expired after this many scans in a row.
SESSIONLESS_SCANS = 2
#: pg_stat_activity keeps this many bytes of an application_name (NAMEDATALEN - 1).
APP_NAME_BYTES = 63


def application_name(host_id: str, incarnation: int | str) -> str:
    """P3: what every session of this incarnation is called in pg_stat_activity."""
    return f"skydeck/{host_id}/{incarnation}".encode()[:APP_NAME_BYTES].decode("utf-8", "ignore")


def self_fence_margin(ttl_s: float) -> float:
    return max(1.0, ttl_s / 10)


class HostInUse(Exception):
    """P3: another live daemon runs under this host id (exit 2)."""


_JOIN = """
INSERT INTO hosts AS h (host_id, incarnation, url, version, started_at, heartbeat_at, expires_at)
VALUES (%(id)s, nextval('fence_seq'), %(url)s, %(version)s, now(), now(),
        now() + make_interval(secs => %(ttl)s))
ON CONFLICT (host_id) DO UPDATE SET
    incarnation = excluded.incarnation, url = excluded.url, version = excluded.version,
    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
    expires_at = excluded.expires_at
WHERE h.expires_at <= now()
RETURNING incarnation
"""

_HEARTBEAT = """
UPDATE hosts SET heartbeat_at = now(), expires_at = now() + make_interval(secs => %(ttl)s)
WHERE host_id = %(id)s AND incarnation = %(inc)s AND expires_at > now()
RETURNING now()
"""

# P9: a claim never waits (SKIP LOCKED), and the claimer must itself be alive.
# Two statements, not the spec's one: when a rival's claim commits while the
# locking SELECT runs, PostgreSQL re-checks the locked row's new version
# (EvalPlanQual) but not the join (LEFT JOIN ... IS NULL, or NOT EXISTS planned
# as an anti-join) that said "no valid owner". *Measured:* 3 racing hosts, 300
# rounds, 28 rounds with 2 winners. So the first statement only locks
# candidates; the second, with a fresh snapshot that sees every claim committed
# before those locks, takes the ones still vacant. The previous owner comes
# back for P15's record ("interrupted: host h2 ...").
_VACANT = """NOT EXISTS (
    SELECT 1 FROM hosts h
    WHERE (h.host_id, h.incarnation) = (l.owner, l.incarnation) AND h.expires_at > now())
  AND EXISTS (
    SELECT 1 FROM hosts
    WHERE host_id = %(id)s AND incarnation = %(inc)s AND expires_at > now())"""
_LOCK_CANDIDATES = """
SELECT l.name FROM leases l
WHERE {vacant} AND {wanted}
ORDER BY (l.home IS NOT DISTINCT FROM %(id)s) DESC,
    (SELECT min(m.seq) FROM messages m
     WHERE m.channel = l.name AND m.state IN {runnable}) NULLS LAST,
    l.name
LIMIT %(room)s
FOR UPDATE OF l SKIP LOCKED
"""
_TAKE = """
WITH c AS (
    SELECT l.name, l.owner, l.incarnation, l.token FROM leases l
    WHERE l.name = ANY(%(locked)s) AND {vacant}
)
UPDATE leases l
SET owner = %(id)s, incarnation = %(inc)s, token = nextval('fence_seq'), home = %(id)s,
    acquired_at = now()
FROM c WHERE l.name = c.name
RETURNING l.name, l.token, c.owner, c.incarnation, c.token
"""

# P15: in the claim's transaction, the orphaned `working` records of the claimed
# channels end as errors, dated at the claim.
_CLOSE_ORPHANS = f"""
UPDATE threads t SET status = {sql_state(ThreadStatus.ERROR)}, output = c.why, ended_at = now()
FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS c(channel, token, why)
WHERE t.channel = c.channel AND t.status = {sql_state(ThreadStatus.WORKING)} AND t.ended_at IS NULL
  AND t.fence IS NOT NULL AND t.fence < c.token
"""

_SESSIONLESS = """
SELECT h.host_id, h.incarnation FROM hosts h
WHERE h.expires_at > now() AND NOT (h.host_id = %(id)s AND h.incarnation = %(inc)s)
  AND NOT EXISTS (
    SELECT 1 FROM pg_stat_activity a
    WHERE a.application_name = left('skydeck/' || h.host_id || '/' || h.incarnation, 63))
"""


def interrupted_text(owner: str | None, incarnation: int | None) -> str:
    """P15: the output of a record its host never ended."""
    return f"interrupted: host {owner or 'unknown'} (incarnation {incarnation}) stopped"


class PgOwnership:
    """This host's identity and leases in a PostgreSQL store, on the control session.

    ``session`` is the control session (P7): heartbeats, claims and releases
    are short, and must not queue behind a batch of the writer's. ``clock`` is
    `time.monotonic` outside tests of the deadline arithmetic: lease timers
    never follow a test's fake clock (P10). ``wall`` is this host's wall clock,
    which the heartbeat compares with the database's (`clock_offset_s`, P23).
    """

    def __init__(
        self,
        session: Session,
        *,
        host_id: str,
        ttl_s: float,
        url: str | None = None,
        version: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.session = session
        self.host_id = host_id
        self.ttl_s = ttl_s
        self.url = url
        self.version = version
        self.clock = clock
        self.wall = wall
        self.incarnation: int | None = None
        #: The incarnation this process gave up last (P10): its sessions are ours.
        self._previous: int | None = None
        #: P10: the monotonic time past which this host must not write as owner.
        self._deadline = -math.inf
        #: Database clock minus this host's wall clock, at the last heartbeat (P23).
        self.clock_offset_s = 0.0
        self._suspects: dict[Incarnation, int] = {}

    # -- identity (P3, P8, P10) ---------------------------------------------------

    def _inc(self) -> int:
        if self.incarnation is None:
            raise NotJoined(f"host {self.host_id} has not joined the store")
        return self.incarnation

    def deadline(self) -> float:
        """P10: monotonic time at which this incarnation stops acting as an owner."""
        return self._deadline

    def alive(self) -> bool:
        return self.incarnation is not None and self.clock() < self._deadline

    def _granted(self, sent: float) -> None:
        self._deadline = sent + self.ttl_s - self_fence_margin(self.ttl_s)

    async def join(self) -> int:
        """Become a new incarnation of this host id (P3); returns it.

        A row still unexpired is a dead predecessor when no session carries its
        name (a fast restart after a crash): it is expired and taken over. One
        with sessions is a live daemon: `HostInUse`.
        """
        params = {
            "id": self.host_id,
            "url": self.url,
            "version": self.version,
            "ttl": self.ttl_s,
        }

        def join(conn: Connection) -> int:
            row = conn.execute(_JOIN, params).fetchone()
            if row is None:
                old = conn.execute(
                    "SELECT incarnation, extract(epoch FROM now() - heartbeat_at)::float8 "
                    "FROM hosts WHERE host_id = %s",
                    (self.host_id,),
                ).fetchone()
                assert old is not None  # the conflict was with this row
                incarnation, age = int(old[0]), float(old[1])
                live = (
                    None
                    if incarnation == self._previous
                    else conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (application_name(self.host_id, incarnation),),
                    ).fetchone()
                )
                if live is not None and live[0] > 0:
                    raise HostInUse(
                        f"host id {self.host_id} is in use by a live daemon (last heartbeat "
                        f"{age:.1f} s ago); choose another --host-id"
                    )
                conn.execute(
                    "UPDATE hosts SET expires_at = now() WHERE host_id = %s AND incarnation = %s",
                    (self.host_id, incarnation),
                )
                log.info(
                    "expired a dead predecessor",
                    extra={"host": self.host_id, "incarnation": incarnation},
                )
                row = conn.execute(_JOIN, params).fetchone()
                assert row is not None
            joined = int(row[0])
            conn.execute(
                "SELECT set_config('application_name', %s, false)",
                (application_name(self.host_id, joined),),
            )
            return joined

        sent = self.clock()
        self.incarnation = await self.session.run(join)
        self._granted(sent)
        self._suspects.clear()
        log.info("joined the store", extra={"host": self.host_id, "incarnation": self.incarnation})
        return self.incarnation

    async def heartbeat(self) -> bool:
        """P8: renew every lease at once. False: this incarnation is dead (P10).

        A store error propagates (`StoreUnreachable`): the deadline then runs
        out by itself unless a later heartbeat succeeds in time.
        """
        params = {"id": self.host_id, "inc": self._inc(), "ttl": self.ttl_s}
        sent = self.clock()
        wall = self.wall()

        def renew(conn: Connection) -> datetime | None:
            row = conn.execute(_HEARTBEAT, params).fetchone()
            return None if row is None else row[0]

        db_now = await self.session.run(renew)
        if db_now is None:
            self._deadline = -math.inf
            return False
        self._granted(sent)
        self.clock_offset_s = db_now.timestamp() - (wall + self.wall()) / 2
        return True

    def forget(self) -> None:
        """P10: this incarnation is over (lease lost); `join` makes the next one."""
        self._previous = self.incarnation
        self.incarnation = None
        self._deadline = -math.inf

    async def leave(self) -> None:
        """P14's last step: release every lease and expire the host row, in one
        transaction, and tell the others (`skydeck_lease`)."""
        if self.incarnation is None:
            return
        inc = self.incarnation

        def leave(conn: Connection) -> None:
            conn.execute(
                "UPDATE leases SET owner = NULL, incarnation = NULL "
                "WHERE owner = %s AND incarnation = %s",
                (self.host_id, inc),
            )
            conn.execute(
                "UPDATE hosts SET expires_at = now() WHERE host_id = %s AND incarnation = %s",
                (self.host_id, inc),
            )
            conn.execute("SELECT pg_notify('skydeck_lease', %s)", (self.host_id,))

        await self.session.run(leave)
        self.forget()

    # -- leases (P9, P15) -----------------------------------------------------------

    async def claim(
        self,
        room: int,
        wanted: Sequence[str] | None = None,
        *,
        roles: bool = False,
        orphans: bool = False,
    ) -> list[Claimed]:
        """Take up to ``room`` claimable leases: channels (``wanted`` names only,
        if given; with ``orphans`` only those a dead owner held, P13), or with
        ``roles`` the cluster roles. Never waits (P9).

        In the same transaction the claimed channels' orphaned `working` thread
        records are ended (P15), so the new owner's turns never overlap them.
        """
        if room <= 0:
            return []
        inc = self._inc()
        # P12: a channel is claimable only while it has an agent (a deleted one's
        # lease row stays, so its owner can still record the cancelled turn).
        has_agent = (
            "EXISTS (SELECT 1 FROM channels ch WHERE ch.name = l.name AND ch.agent IS NOT NULL)"
        )
        if roles:
            condition = "l.name LIKE 'role:%%'"
        elif wanted is not None:
            condition = f"l.name = ANY(%(wanted)s) AND {has_agent}"
        elif orphans:
            condition = f"l.name NOT LIKE 'role:%%' AND l.owner IS NOT NULL AND {has_agent}"
        else:
            condition = f"l.name NOT LIKE 'role:%%' AND {has_agent}"
        lock = (
            _LOCK_CANDIDATES.replace("{wanted}", condition)
            .replace("{vacant}", _VACANT)
            .replace("{runnable}", sql_states({MessageState.QUEUED, MessageState.WORKING}))
        )
        take = _TAKE.replace("{vacant}", _VACANT)
        params: dict[str, object] = {
            "id": self.host_id,
            "inc": inc,
            "room": room,
            "wanted": list(wanted or ()),
        }

        def claim(conn: Connection) -> list[Claimed]:
            locked = [row[0] for row in conn.execute(lock.encode(), params).fetchall()]
            if not locked:
                return []
            rows = conn.execute(take.encode(), {**params, "locked": locked}).fetchall()
            claimed = []
            for name, token, owner, incarnation, old_token in rows:
                reason: ClaimReason = (
                    "orphan" if owner is not None else "released" if old_token else "unowned"
                )
                claimed.append(Claimed(Lease(name, int(token)), reason, owner, incarnation))
            orphans = [c for c in claimed if not c.lease.name.startswith(ROLE_PREFIX)]
            if orphans:
                conn.execute(
                    _CLOSE_ORPHANS,
                    (
                        [c.lease.name for c in orphans],
                        [c.lease.token for c in orphans],
                        [
                            interrupted_text(c.previous_owner, c.previous_incarnation)
                            for c in orphans
                        ],
                    ),
                )
            return claimed

        return await self.session.run(claim)

    async def release(self, names: Sequence[str]) -> int:
        """Give leases up (owner NULL; token and home stay), and say so (P9)."""
        if not names:
            return 0
        inc = self._inc()

        def release(conn: Connection) -> int:
            count = conn.execute(
                "UPDATE leases SET owner = NULL, incarnation = NULL "
                "WHERE name = ANY(%s) AND owner = %s AND incarnation = %s",
                (list(names), self.host_id, inc),
            ).rowcount
            conn.execute("SELECT pg_notify('skydeck_lease', %s)", (self.host_id,))
            return count

        return await self.session.run(release)

    async def owned(self) -> list[Lease]:
        """The leases the store says this incarnation holds."""
        inc = self._inc()

        def owned(conn: Connection) -> list[Lease]:
            rows = conn.execute(
                "SELECT name, token FROM leases WHERE owner = %s AND incarnation = %s "
                "ORDER BY name",
                (self.host_id, inc),
            ).fetchall()
            return [Lease(name, int(token)) for name, token in rows]

        return await self.session.run(owned)

    # -- the cluster (P16, P28) -----------------------------------------------------

    async def hosts(self) -> list[HostInfo]:
        def hosts(conn: Connection) -> list[HostInfo]:
            rows = conn.execute(
                "SELECT h.host_id, h.incarnation, h.url, h.expires_at > now(), "
                "(SELECT count(*) FROM leases l WHERE (l.owner, l.incarnation) = "
                "(h.host_id, h.incarnation) AND l.name NOT LIKE 'role:%'), "
                "extract(epoch FROM now() - h.heartbeat_at)::float8, h.version "
                "FROM hosts h ORDER BY h.host_id"
            ).fetchall()
            return [
                HostInfo(
                    id=row[0],
                    incarnation=int(row[1]),
                    url=row[2],
                    alive=bool(row[3]),
                    owned=int(row[4]),
                    heartbeat_age_s=float(row[5]),
                    version=row[6],
                )
                for row in rows
            ]

        return await self.session.run(hosts)

    async def expire_dead(self) -> list[Incarnation]:
        """P16: expire live host rows that had no session on `SESSIONLESS_SCANS`
        scans in a row; returns them. Safe when wrong: a live host fails its
        next heartbeat and fences itself, and new tokens fence its writes."""
        params = {"id": self.host_id, "inc": self._inc()}
        suspects = self._suspects

        def scan(conn: Connection) -> list[Incarnation]:
            rows = conn.execute(_SESSIONLESS, params).fetchall()
            seen = [Incarnation(host, int(incarnation)) for host, incarnation in rows]
            counts = {key: suspects.get(key, 0) + 1 for key in seen}
            suspects.clear()
            suspects.update(counts)
            dead = [key for key, count in counts.items() if count >= SESSIONLESS_SCANS]
            if dead:
                conn.execute(
                    "UPDATE hosts SET expires_at = now() FROM unnest(%s::text[], %s::bigint[]) "
                    "AS d(host_id, incarnation) "
                    "WHERE (hosts.host_id, hosts.incarnation) = (d.host_id, d.incarnation) "
                    "AND hosts.expires_at > now()",
                    ([h for h, _ in dead], [i for _, i in dead]),
                )
                conn.execute("SELECT pg_notify('skydeck_lease', %s)", (self.host_id,))
                for key in dead:
                    suspects.pop(key, None)
            return dead

        dead = await self.session.run(scan)
        for host, incarnation in dead:
            log.warning(
                "expired a host with no session", extra={"dead": host, "incarnation": incarnation}
            )
        return dead
