"""Telegram: talk to a channel's agent from a chat (shared/spec/telegram.md).

    TelegramClient    the Bot API over one httpx.AsyncClient (T2): every failure a
                      `TelegramError` naming method, status and Telegram's description,
                      never the URL (it holds the token)
    TelegramReceiver  getMe, then long polling (or the webhook route, T13/T14); each
                      batch's effects and the new offset in one transaction, committed
                      before the next getUpdates confirms them (T11)
    TelegramSender    the durable outbox (T31): per-chat order, R20 retries, chat
                      backoff, the global 429 pause, refusals (T32-T36), typing (T29)
    TelegramMirror    the `Mirror` a turn writes its reply through: routing (T25),
                      chunks (T27), the wait for the origin chat (T37)

Why no bot framework: aiogram and python-telegram-bot are asyncio-bound, and
skydeck is Trio; the Bot API is seven JSON POSTs, which httpx already speaks.
What to do with an update, how to cut and format a reply, who may talk are
decided in pure modules (telegram_access, telegram_format); this one does the I/O.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import secrets
import string
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import ledger
from ..errors import Conflict, DeliveryError, NotFound, StoreFailure, Unavailable
from ..ledger import AgentStatus, MessageState, ThreadStatus
from ..model import Accepted, AgentSpec, Inbound, Message, ThreadRecord
from ..store import Fence, Store
from . import telegram_access as access
from .telegram_format import chunk, to_html
from .telegram_store import Link, NewRow, Row, RowState, TelegramStore, link_id

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..registry import Registry

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.telegram.org"
TOKEN_PATTERN = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{30,}$")
SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
MAX_ANSWER_BYTES = 8 * 1024 * 1024
ALLOWED_UPDATES = ["message"]
RESULT_TYPES: dict[str, type] = {
    "getMe": dict,
    "getUpdates": list,
    "sendMessage": dict,
    "sendChatAction": bool,
    "setWebhook": bool,
    "deleteWebhook": bool,
}
RECEIVE_BACKOFF_MAX_S = 60.0
CHAT_BACKOFF_MAX_S = 300.0
R20_ATTEMPTS = 3
R20_STEP_S = 0.25
MAX_PAUSE_S = 3600.0
DEFAULT_PAUSE_S = 5.0
PARALLEL_CHATS = 8
TYPING_EVERY_S = 4.0
JANITOR_EVERY_S = 3600.0
PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
PAIRING_TTL_S = 600.0
NOTICE_EVERY_S = 3600.0
WEBHOOK_PATH = "/api/telegram/webhook"


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


# -- configuration (§1) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelegramConfig:
    token: str
    api_url: str = DEFAULT_API_URL
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret: str | None = None
    poll_timeout_s: float = 30.0
    format: Literal["html", "plain"] = "html"
    pairing: bool = True
    wait_s: float = 10.0
    misconfig_retry_s: float = 60.0

    def __repr__(self) -> str:  # the token is never printed, not even by a traceback
        return f"TelegramConfig(mode={self.mode!r}, api_url={self.api_url!r})"


def load_config(
    *,
    token: str | None,
    token_file: str | None,
    api_url: str | None,
    mode: str | None,
    webhook_url: str | None,
    webhook_secret: str | None,
    poll_timeout_s: float,
    format: str | None,
    pairing: str | None,
    wait_s: float,
    misconfig_retry_s: float,
) -> TelegramConfig | None:
    """T1, T3: the settings, checked; None without a token. A bad value raises
    ValueError with one sentence naming the setting (never the token)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read --telegram-token-file {token_file}: {exc.strerror}"
            ) from None
    if not token:
        return None
    if not TOKEN_PATTERN.match(token):
        raise ValueError(
            "SKYDECK_TELEGRAM_TOKEN is not a bot token (expected <digits>:<secret> from @BotFather)"
        )
    if (mode or "polling") not in ("polling", "webhook"):
        raise ValueError(f"SKYDECK_TELEGRAM_MODE must be polling or webhook, not {mode!r}")
    if mode == "webhook" and not webhook_url:
        raise ValueError("SKYDECK_TELEGRAM_WEBHOOK_URL is needed for SKYDECK_TELEGRAM_MODE=webhook")
    if (format or "html") not in ("html", "plain"):
        raise ValueError(f"SKYDECK_TELEGRAM_FORMAT must be html or plain, not {format!r}")
    if (pairing or "on") not in ("on", "off"):
        raise ValueError(f"SKYDECK_TELEGRAM_PAIRING must be on or off, not {pairing!r}")
    if webhook_secret is not None and not SECRET_PATTERN.match(webhook_secret):
        raise ValueError("SKYDECK_TELEGRAM_WEBHOOK_SECRET must be 1-256 of A-Z a-z 0-9 _ -")
    return TelegramConfig(
        token=token,
        api_url=(api_url or DEFAULT_API_URL).rstrip("/"),
        mode="webhook" if mode == "webhook" else "polling",
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        poll_timeout_s=poll_timeout_s,
        format="plain" if format == "plain" else "html",
        pairing=(pairing or "on") == "on",
        wait_s=wait_s,
        misconfig_retry_s=misconfig_retry_s,
    )


def quiet_http_loggers() -> None:
    """T1: httpx logs every request URL at INFO, and a Bot API URL holds the token."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- the client (T2) --------------------------------------------------------------------


class TelegramError(DeliveryError):
    """A failed Bot API call: ``status`` (None for network errors and timeouts),
    ``description``, ``retry_after``, ``migrate_to``. Its text never holds the URL."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        description: str = "",
        retry_after: float | None = None,
        migrate_to: int | None = None,
        retry: bool = True,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.description = description
        self.retry_after = retry_after
        self.migrate_to = migrate_to
        self.retry = retry


class TelegramMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self.updates = counter("skydeck_telegram_updates", "Updates by outcome", ("outcome",))
        self.polls = counter("skydeck_telegram_polls", "getUpdates calls by result", ("result",))
        self.requests = counter("skydeck_telegram_requests", "Bot API calls", ("method", "code"))
        self.parts = counter("skydeck_telegram_parts_sent", "Messages accepted", ("kind",))
        self.refused = counter("skydeck_telegram_refused", "Rows refused", ("code",))
        self.plain = counter("skydeck_telegram_plain_fallbacks", "Parts resent as plain text (T28)")
        self.rate_limited = counter(
            "skydeck_telegram_rate_limited_seconds", "Seconds paused by 429 (T34)"
        )
        self.webhook_rejected = counter(
            "skydeck_telegram_webhook_rejected", "Webhook posts without the right secret"
        )
        self.delivery = Histogram(
            "skydeck_telegram_delivery_seconds",
            "Stored to last part accepted",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "skydeck_telegram_outbox_depth", "Rows waiting to be sent", registry=registry
        )
        self.outbox_oldest = Gauge(
            "skydeck_telegram_outbox_oldest_seconds", "Age of the oldest pending row",
            registry=registry,
        )  # fmt: skip
        self.offset = Gauge(
            "skydeck_telegram_offset", "Stored getUpdates offset", registry=registry
        )


class TelegramClient:
    def __init__(
        self,
        config: TelegramConfig,
        metrics: TelegramMetrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base = f"{config.api_url}/bot{config.token}/"
        self._metrics = metrics
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0), transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, params: dict[str, Any], *, read_timeout: float = 10.0) -> Any:
        timeout = httpx.Timeout(10.0, connect=5.0, read=read_timeout)
        try:
            response = await self.http.post(self._base + method, json=params, timeout=timeout)
        except httpx.HTTPError as exc:
            self._metrics.requests.labels(method, "network").inc()
            reason = f"network error ({type(exc).__name__})"
            raise TelegramError(f"{method}: {reason}", description=reason) from None
        self._metrics.requests.labels(method, str(response.status_code)).inc()
        if len(response.content) > MAX_ANSWER_BYTES:
            raise TelegramError(f"{method}: answer over 8 MiB", status=response.status_code)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TelegramError(
                f"{method} {response.status_code}: not a JSON answer",
                status=response.status_code if response.status_code >= 400 else None,
                description="not a JSON answer",
            )
        if body.get("ok") is True and response.status_code == 200:
            result = body.get("result")
            if not isinstance(result, RESULT_TYPES.get(method, object)):
                raise TelegramError(
                    f"{method}: answer of the wrong shape", description="answer of the wrong shape"
                )
            return result
        status = response.status_code if response.status_code >= 400 else None
        code = body.get("error_code")
        description = str(body.get("description") or "")[:500]
        raw_parameters = body.get("parameters")
        parameters: dict[str, Any] = raw_parameters if isinstance(raw_parameters, dict) else {}
        retry_after = parameters.get("retry_after")
        if not isinstance(retry_after, int | float) and (
            found := re.search(r"retry after (\d+)", description)
        ):
            retry_after = float(found.group(1))
        migrate = parameters.get("migrate_to_chat_id")
        shown = status if status is not None else code
        raise TelegramError(
            f"{method} {shown}: {description}",
            status=status if status is not None else (code if isinstance(code, int) else None),
            description=description,
            retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
            migrate_to=migrate if type(migrate) is int else None,
        )


@dataclass(slots=True)
class Health:
    mode: str
    bot: str | None = None
    receive: str = "starting"
    send: str = "ok"
    last_ok_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    paused_until: float | None = None

    def ok(self) -> None:
        self.last_ok_at = time.time()

    def error(self, reason: str) -> None:
        self.last_error, self.last_error_at = reason, time.time()


def _backoff(delay: float, cap: float) -> float:
    return min(delay * 2, cap)


# -- the sender (T29, T31-T36) ------------------------------------------------------------


class TelegramSender:
    """Delivers the outbox: each chat strictly in order, up to 8 chats at once."""

    def __init__(
        self,
        store: Store,
        rows: TelegramStore,
        client: TelegramClient,
        config: TelegramConfig,
        metrics: TelegramMetrics,
        health: Health,
    ) -> None:
        self.store = store
        self.rows = rows
        self.client = client
        self.config = config
        self.metrics = metrics
        self.health = health
        #: Replies a turn is waiting on (T37): woken at each change of their rows.
        self.waiting: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        self._busy: set[int] = set()
        self._chat_backoff: dict[int, tuple[float, float]] = {}  # chat -> (until, delay)
        self._pause_until = 0.0
        self._misconfig_delay = 1.0
        self._typing: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                for chat in self.rows.pending_chats():
                    if chat in self._busy or len(self._busy) >= PARALLEL_CHATS:
                        continue
                    if self._chat_backoff.get(chat, (0.0, 0.0))[0] > now:
                        continue
                    self._busy.add(chat)
                    nursery.start_soon(self._drain, chat)
                due = [until for until, _ in self._chat_backoff.values() if until > now]
                self.health.send = self.send_state()
                with trio.move_on_at(min(due, default=now + 60.0)):
                    await self._wake.wait()

    def send_state(self) -> str:
        if self.health.send == "error":
            return "error"
        if self._pause_until > trio.current_time():
            return "paused"
        now = trio.current_time()
        return "retrying" if any(u > now for u, _ in self._chat_backoff.values()) else "ok"

    async def _drain(self, chat: int) -> None:
        try:
            while True:
                row = self.rows.head(chat)
                if row is None or not await self._deliver(row):
                    return
        except StoreFailure as exc:
            log.warning("telegram outbox paused: the store failed", extra={"reason": exc.reason})
            self._chat_backoff[chat] = (trio.current_time() + 1.0, 1.0)
        finally:
            self._busy.discard(chat)
            self.wake()

    async def _paused(self) -> None:
        """T34: a 429 (or a misconfiguration) holds every send until it is over; a
        later pause may extend it while this waits, hence the loop."""
        while (until := self._pause_until) > trio.current_time():  # noqa: ASYNC110
            await trio.sleep_until(until)

    def _params(self, row: Row, plain: bool) -> dict[str, Any]:
        params: dict[str, Any] = {"chat_id": row.chat_id}
        if plain:
            params["text"] = row.text
        else:
            params["text"] = to_html(row.text)
            params["parse_mode"] = "HTML"
        if row.topic_id is not None:
            params["message_thread_id"] = row.topic_id
        if row.reply_to_message_id is not None:
            params["reply_parameters"] = {
                "message_id": row.reply_to_message_id,
                "allow_sending_without_reply": True,
            }
        return params

    async def _deliver(self, row: Row) -> bool:
        """Send one row; True when the chat may go on to its next row."""
        plain = self.config.format == "plain" or row.kind == "notice"
        attempt = 0
        while True:
            await self._paused()
            try:
                result = await self.client.call("sendMessage", self._params(row, plain))
            except TelegramError as exc:
                if exc.status == 429:
                    self._pause(exc)
                    continue
                if exc.status in (401, 404):
                    self._misconfigured(exc)
                    continue
                if exc.status == 400 and "can't parse entities" in exc.description and not plain:
                    plain = True  # T28: at once, as the original text; not a retry
                    self.metrics.plain.inc()
                    continue
                if exc.migrate_to is not None:
                    log.info("telegram chat migrated", extra={"to": exc.migrate_to})
                    self.rows.migrate(row.chat_id, exc.migrate_to)
                    row = replace(row, chat_id=exc.migrate_to)
                    continue
                if exc.transient:
                    attempt += 1
                    self.rows.failed(row, str(exc))
                    if attempt < R20_ATTEMPTS:
                        await trio.sleep(R20_STEP_S * attempt)
                        continue
                    self._retry_later(row.chat_id, exc)
                    await self.store.flushed()
                    self._changed(row)
                    return False
                self._refuse(row, exc)
                await self.store.flushed()
                self._changed(row)
                return True
            self.rows.sent(row, result.get("message_id") if isinstance(result, dict) else None)
            self._chat_backoff.pop(row.chat_id, None)
            self._misconfig_delay = 1.0
            if self.health.send == "error":
                self.health.send = "ok"
            self.health.ok()
            self.metrics.parts.labels(row.kind).inc()
            if row.part == row.parts:
                self.metrics.delivery.observe(max(0.0, time.time() - row.created))
            if row.settle and row.message_id is not None and row.message_id not in self.waiting:
                # In the same commit as `sent` (no checkpoint between): a kill can never
                # leave a delivered reply's turn `failed` behind.
                await settle_late(self.store, self.rows, row.message_id)
            await self.store.flushed()
            self._changed(row)
            return True

    def _pause(self, exc: TelegramError) -> None:
        seconds = min(exc.retry_after if exc.retry_after else DEFAULT_PAUSE_S, MAX_PAUSE_S)
        self._pause_until = max(self._pause_until, trio.current_time() + seconds)
        self.health.paused_until = time.time() + seconds
        self.health.send = "paused"
        self.metrics.rate_limited.inc(seconds)
        log.warning("telegram rate limited", extra={"retry_after_s": seconds})

    def _misconfigured(self, exc: TelegramError) -> None:
        delay = min(self._misconfig_delay, self.config.misconfig_retry_s)
        self._misconfig_delay = _backoff(self._misconfig_delay, self.config.misconfig_retry_s)
        self._pause_until = max(self._pause_until, trio.current_time() + delay)
        self.health.send = "error"
        self.health.error(str(exc))
        log.warning(
            "telegram send failed, retrying",
            extra={"method": "sendMessage", "code": exc.status, "description": exc.description,
                   "backoff_s": delay},
        )  # fmt: skip

    def _retry_later(self, chat: int, exc: TelegramError) -> None:
        delay = self._chat_backoff.get(chat, (0.0, 0.5))[1]
        delay = _backoff(delay, CHAT_BACKOFF_MAX_S)
        self._chat_backoff[chat] = (trio.current_time() + delay, delay)
        self.health.error(str(exc))
        self.health.send = "retrying"
        log.warning(
            "telegram send failed, retrying",
            extra={"method": "sendMessage", "code": exc.status or "network",
                   "description": exc.description, "backoff_s": delay},
        )  # fmt: skip

    def _refuse(self, row: Row, exc: TelegramError) -> None:
        self.rows.refuse(row, str(exc))
        code = str(exc.status)
        self.metrics.refused.labels(code).inc()
        if exc.status == 403:
            self.rows.set_blocked(row.chat_id, True)
        self.health.error(str(exc))
        log.error(
            "telegram send refused",
            extra={"chat_id": row.chat_id, "code": exc.status, "description": exc.description},
        )

    def _changed(self, row: Row) -> None:
        """Wake the turn waiting on this row's reply, if one is (T37)."""
        waiter = self.waiting.get(row.message_id) if row.message_id is not None else None
        if waiter is not None:
            waiter.set()

    # -- typing (T29) ---------------------------------------------------------------------

    def start_typing(self, key: str, chat: int, topic: int | None) -> None:
        if self._nursery is None or key in self._typing:
            return
        stop = trio.Event()
        self._typing[key] = stop
        self._nursery.start_soon(self._type, key, stop, chat, topic)

    def stop_typing(self, key: str) -> None:
        stop = self._typing.pop(key, None)
        if stop is not None:
            stop.set()

    async def _type(self, key: str, stop: trio.Event, chat: int, topic: int | None) -> None:
        """T29: at once (even for a turn that is over before this task runs: the
        chat saw it start), then every 4 s while the message is still working."""
        params: dict[str, Any] = {"chat_id": chat, "action": "typing"}
        if topic is not None:
            params["message_thread_id"] = topic
        try:
            while True:
                if trio.current_time() >= self._pause_until:
                    # typing is a courtesy: no retry, no error state
                    with contextlib.suppress(TelegramError):
                        await self.client.call("sendChatAction", params)
                with trio.move_on_after(TYPING_EVERY_S):
                    await stop.wait()
                message = await self.store.get_message(key)
                if stop.is_set() or message is None or message.reply_id:
                    return
                if message.state is not MessageState.WORKING:
                    return
        finally:
            if self._typing.get(key) is stop:
                del self._typing[key]


async def settle_late(store: Store, rows: TelegramStore, reply_id: str) -> None:
    """T37: a reply whose origin parts were all accepted after its turn stopped
    waiting: the same turn's records go back to ok (no second count or callback)."""
    own = [row for row in rows.rows_of(reply_id) if row.settle]
    if not own or any(row.state is not RowState.SENT for row in own):
        return
    reply = await store.get_message(reply_id)
    if reply is None:
        return
    fence = Fence.local(reply.channel)
    inbound = await store.answered_by(reply_id)
    undone = [m for m in inbound if m.state in (MessageState.FAILED, MessageState.WORKING)]
    if undone:
        await store.set_state(undone, MessageState.DONE, fence)
    thread = await store.get_thread(reply.thread_id) if reply.thread_id else None
    ids = {m.id for m in inbound}
    if thread is not None and thread.message_id in ids and thread.status is ThreadStatus.ERROR:
        moved = ledger.thread_moved(thread, ThreadStatus.OK, output=reply.content)
        await store.rewrite_thread(moved, fence)
    if undone:
        log.info("telegram reply delivered late; turn records ok", extra={"channel": reply.channel})


# -- the mirror (T25-T27, T37) ----------------------------------------------------------------


class TelegramMirror:
    """What a turn on a linked channel writes its reply through."""

    def __init__(
        self, store: Store, rows: TelegramStore, sender: TelegramSender, config: TelegramConfig
    ) -> None:
        self.store = store
        self.rows = rows
        self.sender = sender
        self.config = config

    def serves(self, channel: str) -> bool:
        return channel in self.rows.channels()

    def takes_callbacks(self, channel: str) -> bool:
        return False  # a callback to a linked channel is an ordinary local message

    async def route(self, reply: Message, inbound: Message | None, *, settle: bool) -> list[NewRow]:
        """T25/T26/T27: the rows a reply becomes, fixed when it is stored."""
        batch = await self.store.answered_by(reply.id) or ([inbound] if inbound else [])
        origins: dict[tuple[int, int | None], int] = {}
        for message in batch:
            meta = message.metadata
            if meta.get("source") != "telegram":
                continue
            topic = meta.get("telegram_topic_id")
            key = (int(meta["telegram_chat_id"]), int(topic) if topic else None)
            origins[key] = max(origins.get(key, 0), int(meta["telegram_message_id"]))
        links = self.rows.links(reply.channel)
        parts = chunk(reply.content, reply_id=reply.id)
        out: list[NewRow] = []

        def add(chat: int, topic: int | None, reply_to: int | None, own: bool) -> None:
            for index, text in enumerate(parts):
                out.append(
                    NewRow(
                        chat_id=chat,
                        topic_id=topic,
                        kind="reply",
                        text=text,
                        message_id=reply.id,
                        part=index + 1,
                        parts=len(parts),
                        reply_to_message_id=reply_to if index == 0 else None,
                        settle=own,
                    )
                )

        for (chat, topic), message_id in origins.items():
            admits = any(link.chat_id == chat and link.topic_id in (topic, None) for link in links)
            if admits:
                add(chat, topic, message_id, settle)
        if len(origins) == 0 or any(m.metadata.get("source") != "telegram" for m in batch):
            for link in links:
                key = (link.chat_id, link.topic_id)
                if link.deliver == "all" and link.blocked_at is None and key not in origins:
                    add(link.chat_id, link.topic_id, None, False)
        return out

    async def write_reply(self, reply: Message, inbound: Message) -> str:
        for message in await self.store.answered_by(reply.id) or [inbound]:
            self.sender.stop_typing(message.id)
        thread = await self.store.get_thread(reply.thread_id) if reply.thread_id else None
        succeeded = thread is not None and thread.status is ThreadStatus.OK
        rows = await self.route(reply, inbound, settle=succeeded)
        waits = any(row.settle for row in rows)
        if waits:  # before the rows exist: the sender must not settle them behind our back
            self.sender.waiting[reply.id] = trio.Event()
        try:
            if rows:
                self.rows.queue(rows)
                await self.store.flushed()
                self.sender.wake()
            if not waits:
                return f"telegram:{reply.id}"
            return await self._wait(reply.id)
        finally:
            self.sender.waiting.pop(reply.id, None)

    async def _wait(self, reply_id: str) -> str:
        """T37: the origin chats' parts, accepted within the wait, or why not."""
        deadline = trio.current_time() + self.config.wait_s
        while True:
            event = self.sender.waiting[reply_id] = trio.Event()
            own = [row for row in self.rows.rows_of(reply_id) if row.settle]
            refused = next((row for row in own if row.state is RowState.REFUSED), None)
            if refused is not None:
                found = re.search(r" (\d{3}):", refused.last_error or "")
                raise TelegramError(
                    f"telegram {refused.last_error}",
                    status=int(found.group(1)) if found else 400,
                    retry=False,
                )
            if all(row.state is RowState.SENT for row in own):
                first = own[0]
                return f"tg:{first.chat_id}:{first.telegram_message_id}"
            if trio.current_time() >= deadline:
                last = next((row.last_error for row in own if row.last_error), None)
                raise TelegramError(
                    f"telegram sendMessage: not delivered within {self.config.wait_s:g} s "
                    f"({last or 'not sent yet'}); still retrying",
                    retry=False,
                )
            with trio.move_on_at(deadline):
                await event.wait()

    async def write_thread(
        self, thread: ThreadRecord, phase: Literal["start", "end"], inbound: Message
    ) -> None:
        meta = inbound.metadata
        if phase == "start" and meta.get("source") == "telegram":
            topic = meta.get("telegram_topic_id")
            self.sender.start_typing(
                inbound.id, int(meta["telegram_chat_id"]), int(topic) if topic else None
            )
        elif phase == "end":
            self.sender.stop_typing(inbound.id)

    async def read_session(self, agent: AgentSpec) -> str | None:
        return None

    async def queue_callback(self, callback: Inbound, fence: Fence) -> None:
        raise AssertionError("TelegramMirror takes no callbacks")  # takes_callbacks is False

    async def defer_reply(self, reply: Message, thread: ThreadRecord, fence: Fence) -> None:
        """Nothing to do: the rows are queued already, and the sender settles the
        turn when they land (`settle_late`)."""

    async def clear_session(self, agent: AgentSpec) -> None:
        """Telegram keeps no session."""

    async def queue_notify(self, message: Message, fence: Fence) -> None:
        """mcp.md M17: a progress message goes where the turn's reply will (the
        origin chat, threaded; else the `deliver: all` links), through the outbox,
        and never settles the turn."""
        inbound = await self.store.get_message(message.in_reply_to) if message.in_reply_to else None
        rows = await self.route(message, inbound, settle=False)
        if rows:
            self.rows.queue(rows)
            self.sender.wake()

    async def recover(self) -> None:
        """T38, at start before any replay: a message whose reply is stored never
        runs again; it is settled from its rows as T37 says (its rows queued now
        if a kill came between the reply's commit and theirs)."""
        channels = self.rows.channels()
        for reply_id in self.rows.unsettled_reply_ids(channels):
            reply = await self.store.get_message(reply_id)
            inbound = await self.store.answered_by(reply_id)
            if reply is None or not inbound:
                continue
            fence = Fence.local(reply.channel)
            self.rows.queue(await self.route(reply, inbound[0], settle=True))
            own = [row for row in self.rows.rows_of(reply_id) if row.settle]
            refused = next((row for row in own if row.state is RowState.REFUSED), None)
            if own and all(row.state is RowState.SENT for row in own):
                await settle_late(self.store, self.rows, reply_id)
                continue
            if refused is not None:
                reason = f"telegram {refused.last_error}"
            else:
                reason = (
                    f"telegram sendMessage: not delivered within {self.config.wait_s:g} s "
                    "(interrupted by a restart); still retrying"
                )
            outcome = ledger.undelivered(ledger.succeeded(reply.content, None, None), reason)
            working = [m for m in inbound if m.state is MessageState.WORKING]
            await self.store.set_state(working, outcome.state, fence, outcome.error)
            thread = await self.store.get_thread(reply.thread_id) if reply.thread_id else None
            if thread is not None and thread.status is ThreadStatus.OK:
                moved = ledger.thread_moved(thread, outcome.thread_status, output=outcome.output)
                await self.store.rewrite_thread(moved, fence)


# -- the receiver (T9-T24) --------------------------------------------------------------------


def pairing_text(code: str) -> str:
    return "\n".join(
        [
            f"This chat is not linked to skydeck yet. Pairing code: {code}",
            "",
            "On the skydeck host run:",
            f"skydeck telegram pair {code} --channel <channel>",
            "",
            "The code expires in 10 minutes.",
        ]
    )


def unsupported_text(kind: str) -> str:
    return (
        f"Only text messages reach the agent; this {kind} was not delivered. "
        "Please send your request as text."
    )


def buffered_text(channel: str) -> str:
    return (
        f"No agent serves channel {channel} right now; your message is kept and will be "
        "answered when one does."
    )


class TelegramReceiver:
    def __init__(
        self,
        store: Store,
        rows: TelegramStore,
        client: TelegramClient,
        config: TelegramConfig,
        metrics: TelegramMetrics,
        health: Health,
        sender: TelegramSender,
        registry: Registry,
    ) -> None:
        self.store = store
        self.rows = rows
        self.client = client
        self.config = config
        self.metrics = metrics
        self.health = health
        self.sender = sender
        self.registry = registry
        self.bot: access.Bot | None = None
        self.stopping = False
        self.secret = config.webhook_secret or rows.webhook_secret(
            lambda: "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(64))
        )
        metrics.offset.set_function(lambda: float(rows.offset() or 0))

    def stop(self) -> None:
        self.stopping = True

    async def _with_backoff(self, method: str, params: dict[str, Any]) -> Any:
        delay = 1.0
        while True:
            try:
                result = await self.client.call(method, params)
            except TelegramError as exc:
                self._receive_failed(method, exc, delay)
                await trio.sleep(
                    exc.retry_after if exc.status == 429 and exc.retry_after else delay
                )
                delay = _backoff(delay, RECEIVE_BACKOFF_MAX_S)
                continue
            return result

    def _receive_failed(self, method: str, exc: TelegramError, delay: float) -> None:
        if self.bot is not None:
            self.health.receive = "error"
        self.health.error(str(exc))
        log.warning(
            "telegram poll failed",
            extra={"method": method, "code": exc.status or "network",
                   "description": exc.description, "backoff_s": delay},
        )  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        me = await self._with_backoff("getMe", {})
        self.bot = access.Bot(id=int(me.get("id", 0)), username=str(me.get("username", "")))
        self.health.bot = self.bot.username
        if self.config.mode == "webhook":
            await self._with_backoff(
                "setWebhook",
                {
                    "url": self.config.webhook_url,
                    "secret_token": self.secret,
                    "allowed_updates": ALLOWED_UPDATES,
                    "max_connections": 1,
                    "drop_pending_updates": False,
                },
            )
            self.health.receive = "ok"
            log.info("telegram webhook set", extra={"bot": self.bot.username})
            return
        await self._with_backoff("deleteWebhook", {"drop_pending_updates": False})
        self.health.receive = "ok"
        log.info(f"telegram polling as @{self.bot.username}")
        await self._poll()

    async def _poll(self) -> None:
        delay = 1.0
        timeout = self.config.poll_timeout_s
        while not self.stopping:
            params: dict[str, Any] = {
                "limit": 100,
                "timeout": int(timeout) if timeout == int(timeout) else timeout,
                "allowed_updates": ALLOWED_UPDATES,
            }
            offset = self.rows.offset()
            if offset is not None:
                params["offset"] = offset
            try:
                batch = await self.client.call("getUpdates", params, read_timeout=timeout + 10)
                if any(access.update_id(element) is None for element in batch):
                    raise TelegramError("getUpdates: an update without an integer update_id")
            except TelegramError as exc:
                self.metrics.polls.labels("error").inc()
                self._receive_failed("getUpdates", exc, delay)
                wait = exc.retry_after if exc.status == 429 and exc.retry_after else delay
                delay = _backoff(delay, RECEIVE_BACKOFF_MAX_S)
                await trio.sleep(wait)
                continue
            delay = 1.0
            self.metrics.polls.labels("ok").inc()
            self.health.receive = "ok"
            self.health.ok()
            if batch and not self.stopping:
                try:
                    await self.handle(batch)
                except Unavailable:
                    return  # stopping: unconfirmed, the batch comes again at next start
                except StoreFailure as exc:
                    # The disk, not Telegram: nothing of the batch was confirmed, so
                    # Telegram sends it again; poll again after the backoff (the daemon
                    # stays up and recovers by itself, as for HTTP posts: 507).
                    self.health.receive = "error"
                    self.health.error(exc.message)
                    log.warning(
                        "telegram batch not stored: the store failed",
                        extra={"reason": exc.reason, "backoff_s": delay},
                    )
                    await trio.sleep(delay)
                    delay = _backoff(delay, RECEIVE_BACKOFF_MAX_S)

    # -- one batch: effects, update ids and the offset in one transaction (T11) ---------------

    async def handle(self, batch: list[Any]) -> None:
        """One batch (or one webhook update): decide each update, store the accepted
        messages in one write, then the update ids, the offset, notices and link
        changes in one more, with no checkpoint between the two (the SQLite
        engine's writes do not yield), so they share the tick's group commit; then
        wait for that commit. A kill before it: Telegram sends them all again, and
        whatever did land is recognised (T12, R8)."""
        assert self.bot is not None
        links = self.rows.link_map()
        views = {key: link.view() for key, link in links.items()}
        seen = self.rows.handled([element["update_id"] for element in batch])
        decided: list[tuple[int, access.TgMessage | None, access.Decision | str]] = []
        for element in batch:
            uid = element["update_id"]
            if uid in seen:
                decided.append((uid, None, "duplicate"))
                continue
            seen.add(uid)
            try:
                parsed = access.parse(element)
                if isinstance(parsed, access.Skipped):
                    decided.append((uid, None, parsed.outcome))
                    continue
                decision = access.decide(parsed, views, self.bot, pairing=self.config.pairing)
            except Exception:  # a bug with one update never stops the receiver
                log.exception("telegram update failed; skipped")
                decided.append((uid, None, "malformed"))
                continue
            if isinstance(decision, access.Migrate):
                self.rows.migrate(parsed.chat_id, decision.to)
                links = self.rows.link_map()
                views = {key: link.view() for key, link in links.items()}
            decided.append((uid, parsed, decision))
        inbounds = [
            self._inbound(tg, what, links)
            for _, tg, what in decided
            if tg is not None and isinstance(what, access.Accept)
        ]
        # Stopping (R29): `Unavailable` leaves with nothing of the batch kept, so
        # Telegram sends it again (the poller stops; the webhook answers 503).
        accepted = iter(await self.registry.submit_batch(inbounds) if inbounds else [])
        answers: list[tuple[access.TgMessage, str]] = []
        for _, tg, what in decided:
            if tg is not None and isinstance(what, access.Command):
                text = await self.command(what.name, self._full(links, what.link.id).channel)
                answers.append((tg, text))
        texts = iter(answers)
        outcomes: list[tuple[int, str]] = []
        for uid, tg, what in decided:
            if tg is None or isinstance(what, str):
                outcome = what if isinstance(what, str) else "ignored"
            elif isinstance(what, access.Accept):
                outcome = self._accepted(tg, next(accepted), links)
            elif isinstance(what, access.Command):
                self._notice(tg, next(texts)[1])
                outcome = "command"
            else:
                outcome = self._act(tg, what)
            outcomes.append((uid, outcome))
            self.metrics.updates.labels(outcome).inc()
        self.rows.record_updates([(uid, o) for uid, o in outcomes if o != "duplicate"])
        await self.store.flushed()
        self.sender.wake()

    def _inbound(
        self,
        message: access.TgMessage,
        decision: access.Decision,
        links: dict[tuple[int, int | None], Link],
    ) -> Inbound:
        assert isinstance(decision, access.Accept)
        return Inbound(
            channel=self._full(links, decision.link.id).channel,
            content=decision.content,
            metadata=access.metadata(message),
            external_id=access.external_id(message.chat_id, message.message_id),
        )

    def _notice(self, message: access.TgMessage, text: str) -> None:
        self.rows.queue(
            [
                NewRow(
                    chat_id=message.chat_id,
                    topic_id=message.topic_id,
                    kind="notice",
                    text=text,
                    reply_to_message_id=message.message_id,
                )
            ]
        )

    def _accepted(
        self,
        message: access.TgMessage,
        accepted: Accepted,
        links: dict[tuple[int, int | None], Link],
    ) -> str:
        if accepted.state == "duplicate":
            return "duplicate"
        link = next(
            link
            for link in links.values()
            if link.channel == accepted.message.channel
            and link.chat_id == message.chat_id
            and link.topic_id in (message.topic_id, None)
        )
        changes: dict[str, Any] = {}
        if link.blocked_at is not None:
            changes["blocked_at"] = None  # T36: its next message clears it
        if link.chat_type is None or (message.title and link.title != message.title):
            changes["chat_type"], changes["title"] = message.chat_type, message.title
        if accepted.state is MessageState.BUFFERED:
            now = time.time()
            if link.notice_at is None or now - link.notice_at >= NOTICE_EVERY_S:
                changes["notice_at"] = now
                self._notice(message, buffered_text(link.channel))
        if changes:  # the batch's later updates see it (one notice per hour, T19)
            links[(link.chat_id, link.topic_id)] = self.rows.update_link(link.id, changes)
        return "accepted"

    def _act(self, message: access.TgMessage, decision: access.Decision) -> str:
        if isinstance(decision, access.Unsupported):
            self._notice(message, unsupported_text(decision.kind))
            return "unsupported"
        if isinstance(decision, access.Unlinked):
            if not decision.pairing:
                return "unlinked"
            now = time.time()
            if self.rows.pending_pairing_for(message.chat_id, now):
                return "unlinked"
            code = "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(6))
            self.rows.add_pairing(
                {
                    "code": code,
                    "chat_id": message.chat_id,
                    "topic_id": message.topic_id,
                    "chat_type": message.chat_type,
                    "title": message.title,
                    "user": message.user,
                    "created_at": now,
                    "expires_at": now + PAIRING_TTL_S,
                }
            )
            self._notice(message, pairing_text(code))
            return "pairing"
        return "ignored"

    @staticmethod
    def _full(links: dict[tuple[int, int | None], Link], lid: str) -> Link:
        return next(link for link in links.values() if link.id == lid)

    def _agent(self, channel: str) -> AgentSpec | None:
        return next((a for a in self.registry.agents() if a.channel == channel), None)

    async def command(self, name: str, channel: str) -> str:
        """T22-T24: the transport's own commands, answered in the update's transaction."""
        agent = self._agent(channel)
        if name in ("start", "help"):
            if agent is None:
                return (
                    f"This chat talks to channel {channel}; no agent serves it yet, so "
                    "messages are kept until one does."
                )
            return (
                f"This chat talks to channel {channel} (agent {agent.name}).\n\n"
                "Send a message to talk to it. /reset starts a fresh conversation; "
                "/status shows what it is doing."
            )
        if name == "reset":
            if agent is None:
                return f"No agent serves channel {channel}; there is nothing to reset."
            if agent.mode != "single-threaded":
                return (
                    f"Agent {agent.name} is multi-threaded: every message already starts a "
                    "fresh conversation."
                )
            await self.registry.reset(agent.name)
            return "Session cleared: the next message starts a fresh conversation."
        if agent is None:
            kept = self.rows.buffered(channel)
            return f"No agent serves channel {channel}; {kept} messages are kept for it."
        status, waiting = self.registry.status(agent.name)
        if status is AgentStatus.QUEUED:
            return f"{agent.name} on {channel}: {status.value} ({waiting} waiting)"
        return f"{agent.name} on {channel}: {status.value}"

    # -- the webhook (T14) ----------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        ok = header is not None and hmac.compare_digest(
            header.encode("utf-8", "replace"), self.secret.encode()
        )
        if not ok:
            self.metrics.webhook_rejected.inc()
        return ok

    async def webhook(self, body: bytes) -> dict[str, Any]:
        try:
            update = json.loads(body)
        except ValueError:
            update = None
        if self.bot is None:  # getMe has not answered yet (T9): Telegram sends it again
            raise Unavailable("skydeck is still starting; Telegram sends the update again")
        if access.update_id(update) is None:
            self.metrics.updates.labels("malformed").inc()
            return {"ok": True, "state": "ignored"}
        await self.handle([update])
        return {"ok": True}


# -- pairing through the API (§9) and the whole transport ------------------------------------


def pair(
    rows: TelegramStore,
    code: str,
    channel: str,
    trigger: Literal["all", "mention"] | None,
    deliver: Literal["all", "origin"],
) -> Link:
    pending = rows.pairing(code.upper(), time.time())
    if pending is None:
        raise NotFound("no such pairing code (unknown, used or expired)", field="code")
    private = pending["chat_type"] == "private"
    if rows.link(link_id(pending["chat_id"], pending["topic_id"])) is not None:
        raise Conflict(f"chat {pending['chat_id']} got linked meanwhile", field="code")
    link = rows.add_link(
        chat_id=pending["chat_id"],
        topic_id=pending["topic_id"],
        channel=channel,
        trigger="all" if private else (trigger or "mention"),
        deliver=deliver,
        allow_users=None,
        chat_type=pending["chat_type"],
        title=pending["title"],
    )
    rows.use_pairing(pending["code"])
    rows.queue(
        [
            NewRow(
                chat_id=link.chat_id,
                topic_id=link.topic_id,
                kind="notice",
                text=f"Linked: this chat now talks to channel {channel}.",
            )
        ]
    )
    return link


class Telegram:
    """The transport as the service runs it: the parts above, wired once."""

    def __init__(
        self,
        store: Store,
        rows: TelegramStore,
        config: TelegramConfig,
        registry_metrics: CollectorRegistry,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        quiet_http_loggers()
        self.store = store
        self.rows = rows
        self.config = config
        self.metrics = TelegramMetrics(registry_metrics)
        self.health = Health(mode=config.mode)
        self.client = TelegramClient(config, self.metrics, transport=transport)
        self.sender = TelegramSender(store, rows, self.client, config, self.metrics, self.health)
        self.mirror = TelegramMirror(store, rows, self.sender, config)
        self.receiver: TelegramReceiver | None = None
        self.metrics.outbox_depth.set_function(lambda: float(rows.depth()[0]))
        self.metrics.outbox_oldest.set_function(self._oldest)

    def _oldest(self) -> float:
        oldest = self.rows.depth()[1]
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def receive_with(self, registry: Registry) -> TelegramReceiver:
        self.receiver = TelegramReceiver(
            self.store,
            self.rows,
            self.client,
            self.config,
            self.metrics,
            self.health,
            self.sender,
            registry,
        )
        return self.receiver

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.receiver is not None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.sender.run, name="telegram-sender")
                await nursery.start(self.receiver.run, name="telegram-receiver")
                nursery.start_soon(self._janitor, name="telegram-janitor")
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _janitor(self) -> None:
        while True:
            with contextlib.suppress(StoreFailure):  # the next hour tries again
                self.rows.prune(time.time())
            await trio.sleep(JANITOR_EVERY_S)

    def health_block(self) -> dict[str, Any]:
        depth, oldest = self.rows.depth()
        health = self.health
        now = time.time()
        paused = health.paused_until if health.paused_until and health.paused_until > now else None
        return {
            "mode": health.mode,
            "bot": health.bot,
            "receive": health.receive,
            "send": self.sender.send_state(),
            "last_ok_at": iso(health.last_ok_at),
            "last_error": health.last_error,
            "last_error_at": iso(health.last_error_at),
            "paused_until": iso(paused),
            "outbox": depth,
            "oldest_pending_s": None if oldest is None else round(max(0.0, now - oldest), 3),
            "refused_24h": self.rows.refused_since(now - 24 * 3600),
            "links": len(self.rows.links()),
            "pairings": len(self.rows.pairings(now)),
        }
