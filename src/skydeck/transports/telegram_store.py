"""Telegram's tables in the skydeck store (telegram.md §2, T8, T11, T12, T31).

`telegram_links` (chat or forum topic -> channel), `telegram_updates` (handled
update ids, T12), `telegram_pairings` (T8), `telegram_outbox` (every part and
notice to send, T31), and meta `telegram_offset` / `telegram_webhook_secret`.

They live in the same SQLite file and join the same group commit as the
messages: writes go through the engine's write seam (`SQLiteStore._tx`, one SAVEPOINT
joined to the open transaction), so a batch's inbound messages, its update ids,
its notices and the new offset commit together or not at all, and a reply's
outbox rows commit with the reply. Reads are plain SELECTs on the store's
connection, which no other thread touches. These calls are synchronous, like
the engine's own statements, so a run of them is never interleaved with another
task's writes. (A PostgreSQL engine, multi-host.md §7, would bring its own.)
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from ..errors import Conflict, NotFound
from ..ledger import MessageState
from ..model import utc_now
from ..store.sqlite import SQLiteStore
from .telegram_access import LinkView

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telegram_links (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    chat_id INTEGER NOT NULL,
    topic_id INTEGER,
    channel TEXT NOT NULL,
    chat_type TEXT,
    title TEXT,
    trigger TEXT NOT NULL,
    deliver TEXT NOT NULL,
    allow_users TEXT,
    blocked_at TEXT,
    notice_at REAL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS telegram_links_channel ON telegram_links (channel, seq);
CREATE TABLE IF NOT EXISTS telegram_updates (
    update_id INTEGER PRIMARY KEY,
    outcome TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS telegram_pairings (
    code TEXT PRIMARY KEY,
    chat_id INTEGER NOT NULL UNIQUE,
    topic_id INTEGER,
    chat_type TEXT NOT NULL,
    title TEXT,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS telegram_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL,
    topic_id INTEGER,
    kind TEXT NOT NULL,
    message_id TEXT,
    part INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    text TEXT NOT NULL,
    reply_to_message_id INTEGER,
    settle INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    telegram_message_id INTEGER,
    created_at TEXT NOT NULL,
    created REAL NOT NULL,
    done REAL
);
CREATE INDEX IF NOT EXISTS telegram_outbox_open ON telegram_outbox (chat_id, seq)
    WHERE state = 'pending';
CREATE UNIQUE INDEX IF NOT EXISTS telegram_outbox_part
    ON telegram_outbox (message_id, chat_id, IFNULL(topic_id, 0), part)
    WHERE message_id IS NOT NULL;
"""

OFFSET_KEY = "telegram_offset"
SECRET_KEY = "telegram_webhook_secret"
UPDATES_KEPT_S = 48 * 3600.0
DONE_ROWS_KEPT_S = 24 * 3600.0
MAX_PENDING_PAIRINGS = 50


class RowState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Link:
    id: str
    chat_id: int
    topic_id: int | None
    channel: str
    chat_type: str | None
    title: str | None
    trigger: Literal["all", "mention"]
    deliver: Literal["all", "origin"]
    allow_users: tuple[str, ...] | None
    blocked_at: str | None
    created_at: str
    notice_at: float | None = None

    def view(self) -> LinkView:
        return LinkView(self.id, self.channel, self.trigger, self.allow_users, self.chat_type)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "chat_id": str(self.chat_id),
            "topic_id": self.topic_id,
            "channel": self.channel,
            "chat_type": self.chat_type,
            "title": self.title,
            "trigger": self.trigger,
            "deliver": self.deliver,
            "allow_users": list(self.allow_users) if self.allow_users is not None else None,
            "blocked_at": self.blocked_at,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Row:
    """One message to send: a reply's part or a notice."""

    seq: int
    chat_id: int
    topic_id: int | None
    kind: Literal["reply", "notice"]
    message_id: str | None
    part: int
    parts: int
    text: str
    reply_to_message_id: int | None
    settle: bool
    state: RowState
    attempts: int
    last_error: str | None
    telegram_message_id: int | None
    created_at: str
    created: float

    def to_json(self) -> dict[str, Any]:
        """§9's outbox item: no text."""
        return {
            "seq": self.seq,
            "chat_id": str(self.chat_id),
            "message_id": self.message_id,
            "part": self.part,
            "parts": self.parts,
            "kind": self.kind,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class NewRow:
    chat_id: int
    topic_id: int | None
    kind: Literal["reply", "notice"]
    text: str
    message_id: str | None = None
    part: int = 1
    parts: int = 1
    reply_to_message_id: int | None = None
    settle: bool = False


def link_id(chat_id: int, topic_id: int | None) -> str:
    return str(chat_id) if topic_id is None else f"{chat_id}:{topic_id}"


def _link(row: sqlite3.Row) -> Link:
    allow = json.loads(row["allow_users"]) if row["allow_users"] is not None else None
    return Link(
        id=row["id"],
        chat_id=row["chat_id"],
        topic_id=row["topic_id"],
        channel=row["channel"],
        chat_type=row["chat_type"],
        title=row["title"],
        trigger=row["trigger"],
        deliver=row["deliver"],
        allow_users=tuple(allow) if allow is not None else None,
        blocked_at=row["blocked_at"],
        created_at=row["created_at"],
        notice_at=row["notice_at"],
    )


def _row(row: sqlite3.Row) -> Row:
    return Row(
        seq=row["seq"],
        chat_id=row["chat_id"],
        topic_id=row["topic_id"],
        kind=row["kind"],
        message_id=row["message_id"],
        part=row["part"],
        parts=row["parts"],
        text=row["text"],
        reply_to_message_id=row["reply_to_message_id"],
        settle=bool(row["settle"]),
        state=RowState(row["state"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        telegram_message_id=row["telegram_message_id"],
        created_at=row["created_at"],
        created=row["created"],
    )


class TelegramStore:
    """Telegram's rows, on the skydeck store's connection and commits."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        with store._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        store.commit()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        rows: list[sqlite3.Row] = self.store._db.execute(sql, args).fetchall()
        return rows

    def _meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # -- links ----------------------------------------------------------------------

    def links(self, channel: str | None = None) -> list[Link]:
        if channel is None:
            rows = self._read("SELECT * FROM telegram_links ORDER BY seq")
        else:
            rows = self._read(
                "SELECT * FROM telegram_links WHERE channel = ? ORDER BY seq", (channel,)
            )
        return [_link(row) for row in rows]

    def link(self, lid: str) -> Link | None:
        rows = self._read("SELECT * FROM telegram_links WHERE id = ?", (lid,))
        return _link(rows[0]) if rows else None

    def link_map(self) -> dict[tuple[int, int | None], Link]:
        return {(link.chat_id, link.topic_id): link for link in self.links()}

    def channels(self) -> set[str]:
        return {row[0] for row in self._read("SELECT DISTINCT channel FROM telegram_links")}

    def add_link(
        self,
        *,
        chat_id: int,
        topic_id: int | None,
        channel: str,
        trigger: Literal["all", "mention"],
        deliver: Literal["all", "origin"],
        allow_users: tuple[str, ...] | None,
        chat_type: str | None = None,
        title: str | None = None,
    ) -> Link:
        lid = link_id(chat_id, topic_id)
        if self.link(lid) is not None:
            raise Conflict(f"chat {lid} is already linked", field="chat_id")
        with self.store._tx() as db:
            db.execute(
                "INSERT INTO telegram_links (id, chat_id, topic_id, channel, chat_type, title, "
                "trigger, deliver, allow_users, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    lid,
                    chat_id,
                    topic_id,
                    channel,
                    chat_type,
                    title,
                    trigger,
                    deliver,
                    json.dumps(list(allow_users)) if allow_users is not None else None,
                    utc_now(),
                ),
            )
        link = self.link(lid)
        assert link is not None
        return link

    def update_link(self, lid: str, changes: dict[str, Any]) -> Link:
        if self.link(lid) is None:
            raise NotFound(f"no link with id {lid!r}", field="id")
        columns = {"channel", "trigger", "deliver", "allow_users", "chat_type", "title",
                   "blocked_at", "notice_at"}  # fmt: skip
        sets, args = [], []
        for key, value in changes.items():
            assert key in columns, key
            if key == "allow_users" and value is not None:
                value = json.dumps(list(value))
            sets.append(f"{key} = ?")
            args.append(value)
        if sets:
            with self.store._tx() as db:
                db.execute(
                    f"UPDATE telegram_links SET {', '.join(sets)} WHERE id = ?", (*args, lid)
                )
        link = self.link(lid)
        assert link is not None
        return link

    def delete_link(self, lid: str) -> None:
        if self.link(lid) is None:
            raise NotFound(f"no link with id {lid!r}", field="id")
        with self.store._tx() as db:
            db.execute("DELETE FROM telegram_links WHERE id = ?", (lid,))

    def set_blocked(self, chat_id: int, blocked: bool) -> None:
        with self.store._tx() as db:
            db.execute(
                "UPDATE telegram_links SET blocked_at = ? WHERE chat_id = ? AND "
                + ("blocked_at IS NULL" if blocked else "blocked_at IS NOT NULL"),
                (utc_now() if blocked else None, chat_id),
            )

    def migrate(self, old: int, new: int) -> None:
        """T20: the chat's links and pending rows move to the supergroup's id."""
        with self.store._tx() as db:
            for link in self.links():
                if link.chat_id == old and self.link(link_id(new, link.topic_id)) is None:
                    db.execute(
                        "UPDATE telegram_links SET chat_id = ?, id = ?, chat_type = ? WHERE id = ?",
                        (new, link_id(new, link.topic_id), "supergroup", link.id),
                    )
            db.execute(
                "UPDATE telegram_outbox SET chat_id = ? WHERE chat_id = ? AND state = ?",
                (new, old, RowState.PENDING),
            )

    # -- updates and the offset (T11, T12) ---------------------------------------------

    def offset(self) -> int | None:
        raw = self._meta(OFFSET_KEY)
        return int(raw) if raw is not None else None

    def handled(self, update_ids: list[int]) -> set[int]:
        """T12: which of these updates were handled already (below the offset, or recorded)."""
        offset = self.offset()
        below = {uid for uid in update_ids if offset is not None and uid < offset}
        rest = [uid for uid in update_ids if uid not in below]
        if rest:
            marks = ",".join("?" * len(rest))
            rows = self._read(
                f"SELECT update_id FROM telegram_updates WHERE update_id IN ({marks})", tuple(rest)
            )
            below |= {row[0] for row in rows}
        return below

    def record_updates(self, outcomes: list[tuple[int, str]]) -> None:
        """The updates are handled (T12) and the offset moves past them (T11), in one write."""
        if not outcomes:
            return
        now = time.time()
        offset = self.offset()
        highest = max(uid for uid, _ in outcomes) + 1
        with self.store._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO telegram_updates (update_id, outcome, at) VALUES (?,?,?)",
                [(uid, outcome, now) for uid, outcome in outcomes],
            )
            if offset is None or highest > offset:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (OFFSET_KEY, str(highest)),
                )

    def webhook_secret(self, make: Any) -> str:
        secret = self._meta(SECRET_KEY)
        if secret is None:
            secret = str(make())
            with self.store._tx() as db:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (SECRET_KEY, secret))
        return secret

    # -- pairing (T8) -------------------------------------------------------------------

    def pairings(self, now: float) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT * FROM telegram_pairings WHERE expires_at > ? ORDER BY created_at", (now,)
        )
        return [dict(row) for row in rows]

    def pairing(self, code: str, now: float) -> dict[str, Any] | None:
        rows = self._read(
            "SELECT * FROM telegram_pairings WHERE code = ? AND expires_at > ?", (code, now)
        )
        return dict(rows[0]) if rows else None

    def pending_pairing_for(self, chat_id: int, now: float) -> bool:
        rows = self._read(
            "SELECT 1 FROM telegram_pairings WHERE chat_id = ? AND expires_at > ?", (chat_id, now)
        )
        return bool(rows)

    def add_pairing(self, values: dict[str, Any]) -> None:
        with self.store._tx() as db:
            db.execute("DELETE FROM telegram_pairings WHERE chat_id = ?", (values["chat_id"],))
            db.execute(
                "INSERT INTO telegram_pairings (code, chat_id, topic_id, chat_type, title, user, "
                "created_at, expires_at) VALUES (:code, :chat_id, :topic_id, :chat_type, :title, "
                ":user, :created_at, :expires_at)",
                values,
            )
            db.execute(
                "DELETE FROM telegram_pairings WHERE code NOT IN (SELECT code FROM "
                "telegram_pairings ORDER BY created_at DESC LIMIT ?)",
                (MAX_PENDING_PAIRINGS,),
            )

    def use_pairing(self, code: str) -> None:
        with self.store._tx() as db:
            db.execute("DELETE FROM telegram_pairings WHERE code = ?", (code,))

    # -- the outbox (T31) ---------------------------------------------------------------

    def queue(self, rows: list[NewRow]) -> int:
        """Insert rows (a reply's parts once per reply id: retries never queue twice)."""
        added = 0
        now_iso, now = utc_now(), time.time()
        with self.store._tx() as db:
            for row in rows:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO telegram_outbox (chat_id, topic_id, kind, message_id, "
                    "part, parts, text, reply_to_message_id, settle, state, created_at, created) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        row.chat_id,
                        row.topic_id,
                        row.kind,
                        row.message_id,
                        row.part,
                        row.parts,
                        row.text,
                        row.reply_to_message_id,
                        int(row.settle),
                        RowState.PENDING,
                        now_iso,
                        now,
                    ),
                )
                added += cursor.rowcount
        return added

    def pending_chats(self) -> list[int]:
        """Chats with rows to send, the one waiting longest first."""
        rows = self._read(
            "SELECT chat_id, MIN(seq) AS first FROM telegram_outbox WHERE state = 'pending' "
            "GROUP BY chat_id ORDER BY first"
        )
        return [row["chat_id"] for row in rows]

    def head(self, chat_id: int) -> Row | None:
        rows = self._read(
            "SELECT * FROM telegram_outbox WHERE chat_id = ? AND state = 'pending' "
            "ORDER BY seq LIMIT 1",
            (chat_id,),
        )
        return _row(rows[0]) if rows else None

    def rows_of(self, message_id: str) -> list[Row]:
        rows = self._read(
            "SELECT * FROM telegram_outbox WHERE message_id = ? ORDER BY seq", (message_id,)
        )
        return [_row(row) for row in rows]

    def sent(self, row: Row, telegram_message_id: int | None) -> None:
        with self.store._tx() as db:
            db.execute(
                "UPDATE telegram_outbox SET state = ?, telegram_message_id = ?, done = ?, "
                "attempts = attempts + 1 WHERE seq = ?",
                (RowState.SENT, telegram_message_id, time.time(), row.seq),
            )

    def failed(self, row: Row, error: str) -> None:
        with self.store._tx() as db:
            db.execute(
                "UPDATE telegram_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error, row.seq),
            )

    def refuse(self, row: Row, error: str) -> int:
        """The row and the rest of its reply for that chat are refused (T36)."""
        with self.store._tx() as db:
            if row.message_id is None:
                where, args = "seq = ?", (row.seq,)
            else:
                where = "message_id = ? AND chat_id = ? AND seq >= ? AND state = ?"
                args = (row.message_id, row.chat_id, row.seq, RowState.PENDING)  # type: ignore[assignment]
            cursor = db.execute(
                f"UPDATE telegram_outbox SET state = ?, last_error = ?, done = ?, "
                f"attempts = attempts + (seq = {row.seq}) WHERE {where}",
                (RowState.REFUSED, error, time.time(), *args),
            )
        return cursor.rowcount

    def outbox(self, now: float) -> list[Row]:
        rows = self._read(
            "SELECT * FROM telegram_outbox WHERE state = 'pending' OR "
            "(state = 'refused' AND done > ?) ORDER BY seq",
            (now - DONE_ROWS_KEPT_S,),
        )
        return [_row(row) for row in rows]

    def depth(self) -> tuple[int, float | None]:
        """Pending rows, and when the oldest was stored (epoch seconds)."""
        (count, oldest) = self._read(
            "SELECT COUNT(*), MIN(created) FROM telegram_outbox WHERE state = 'pending'"
        )[0]
        return int(count), oldest

    def refused_since(self, since: float) -> int:
        return int(
            self._read(
                "SELECT COUNT(*) FROM telegram_outbox WHERE state = 'refused' AND done > ?",
                (since,),
            )[0][0]
        )

    def unsettled_reply_ids(self, channels: set[str]) -> list[str]:
        """Replies stored while their turn waited on delivery (T38): the inbound
        messages are still `working` though the turn is over."""
        if not channels:
            return []
        marks = ",".join("?" * len(channels))
        rows = self._read(
            "SELECT DISTINCT reply_id FROM messages WHERE direction = 'in' AND state = ? "
            f"AND reply_id IS NOT NULL AND channel IN ({marks})",
            (MessageState.WORKING, *sorted(channels)),
        )
        return [row[0] for row in rows]

    def buffered(self, channel: str) -> int:
        rows = self._read(
            "SELECT COUNT(*) FROM messages WHERE channel = ? AND state = ?",
            (channel, MessageState.BUFFERED),
        )
        return int(rows[0][0])

    def prune(self, now: float) -> None:
        """The janitor (hourly): old update ids, expired pairings, delivered rows."""
        with self.store._tx() as db:
            db.execute("DELETE FROM telegram_updates WHERE at < ?", (now - UPDATES_KEPT_S,))
            db.execute("DELETE FROM telegram_pairings WHERE expires_at <= ?", (now,))
            db.execute(
                "DELETE FROM telegram_outbox WHERE state != 'pending' AND done < ?",
                (now - DONE_ROWS_KEPT_S,),
            )
