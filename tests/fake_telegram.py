"""A fake Telegram Bot API (shared/spec/telegram.md §12): the far side of the
network, on loopback, speaking the real wire format and at least as strict as
Telegram about what it takes.

`FakeTelegram` is importable (tests drive it by its Python methods, and
`serving()` runs it on a real socket) and runnable
(`python tests/fake_telegram.py [--host 127.0.0.1] [--port 0] [--token T]`,
then scripted over `POST /_fake/<name>`). Every call the bot makes is recorded
(`requests()`), every text Telegram would show is kept (`texts()`), and any
method can be scripted to fail the ways Telegram fails (`fail()`, `outage()`).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, request
from quart_trio import QuartTrio

TOKEN = "123456:TEST-token-0123456789abcdefghijklmnopqr"
BOT_ID = 7000000001
BOT_USERNAME = "skydeck_test_bot"
FIRST_UPDATE_ID = 100000001
FIRST_BOT_MESSAGE_ID = 1000
TEXT_LIMIT = 4096
ALLOWED_TAGS = frozenset(
    [
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "code",
        "pre",
        "a",
        "blockquote",
        "tg-spoiler",
        "span",
    ]
)
CHAT_ACTIONS = frozenset(
    [
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    ]
)
CONFLICT_POLL = (
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance "
    "is running"
)
CONFLICT_WEBHOOK = (
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to "
    "delete the webhook first"
)
SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_TOKEN_RE = re.compile(
    r"<(/?)([A-Za-z][A-Za-z0-9-]*)((?:\s[^<>]*)?)>|&(?:#\d+|#x[0-9a-fA-F]+|\w+);"
)


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


def visible_html(text: str) -> str:
    """The text Telegram shows for ``parse_mode: HTML``, or ApiError(400) as Telegram would."""
    out: list[str] = []
    stack: list[str] = []
    pos = 0
    for match in _TOKEN_RE.finditer(text):
        chunk = text[pos : match.start()]
        if "<" in chunk or "&" in chunk:
            bad = "<" if "<" in chunk else "&"
            raise ApiError(400, f"Bad Request: can't parse entities: unexpected {bad!r}")
        out.append(chunk)
        pos = match.end()
        token = match.group(0)
        if token.startswith("&"):
            unescaped = html.unescape(token)
            if unescaped == token:
                raise ApiError(400, f"Bad Request: can't parse entities: unknown entity {token}")
            out.append(unescaped)
            continue
        closing, tag = match.group(1) == "/", match.group(2).lower()
        if tag not in ALLOWED_TAGS:
            raise ApiError(400, f"Bad Request: can't parse entities: unsupported tag {tag!r}")
        if closing:
            if not stack or stack[-1] != tag:
                raise ApiError(400, f"Bad Request: can't parse entities: unmatched end tag {tag}")
            stack.pop()
        else:
            stack.append(tag)
    rest = text[pos:]
    if "<" in rest or "&" in rest:
        raise ApiError(400, "Bad Request: can't parse entities: unexpected end of text")
    if stack:
        raise ApiError(400, f"Bad Request: can't parse entities: unclosed tag {stack[-1]}")
    out.append(rest)
    return "".join(out)


@dataclass
class Chat:
    id: int
    type: str = "private"
    title: str | None = None
    is_forum: bool = False
    next_message_id: int = 1
    next_bot_message_id: int = FIRST_BOT_MESSAGE_ID
    message_ids: set[int] = field(default_factory=set)
    last_bot_message: dict[str, Any] | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "private":
            out["first_name"] = "User"
        else:
            out["title"] = self.title or f"Group {self.id}"
        if self.is_forum:
            out["is_forum"] = True
        return out


@dataclass
class FakeTelegram:
    token: str = TOKEN
    chats: dict[int, Chat] = field(default_factory=dict)
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    pending: list[Any] = field(default_factory=list)
    next_id: int = FIRST_UPDATE_ID
    confirmed_offset: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    sent: dict[int, list[str]] = field(default_factory=dict)
    scripted: dict[str, list[str]] = field(default_factory=dict)
    down: str | None = None
    blocked: set[int] = field(default_factory=set)
    webhook: dict[str, Any] | None = None
    last_batch: list[Any] = field(default_factory=list)
    webhook_sent: list[dict[str, Any]] = field(default_factory=list)
    webhook_answers: list[int | None] = field(default_factory=list)
    confirm_hook: Callable[[int], None] | None = None
    _redeliver: bool = False
    _pushed: trio.Event = field(default_factory=trio.Event)
    _poll_generation: int = 0
    _webhook_queue: list[dict[str, Any]] = field(default_factory=list)
    _webhook_wake: trio.Event = field(default_factory=trio.Event)

    # -- scripting ------------------------------------------------------------------

    def chat(
        self,
        chat_id: int,
        type: str | None = None,
        title: str | None = None,
        is_forum: bool = False,
    ) -> dict[str, Any]:
        """Register (or change) a chat; ids > 0 are private chats unless told."""
        kind = type or ("private" if chat_id > 0 else "supergroup")
        known = self.chats.get(chat_id)
        if known is None:
            known = self.chats[chat_id] = Chat(chat_id)
        known.type, known.title, known.is_forum = kind, title, is_forum
        return known.json()

    def user(
        self, user_id: int, username: str | None = None, first_name: str = "User"
    ) -> dict[str, Any]:
        self.users[user_id] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            self.users[user_id]["username"] = username
        return self.users[user_id]

    def _ensure_chat(self, chat_id: int) -> Chat:
        if chat_id not in self.chats:
            self.chat(chat_id)
        return self.chats[chat_id]

    def message(
        self,
        chat_id: int,
        text: str | None,
        *,
        from_id: int,
        thread_id: int | None = None,
        reply_to_bot: bool = False,
        mention: bool = False,
        is_bot: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """A Message as Telegram sends it (not queued): entities computed."""
        chat = self._ensure_chat(chat_id)
        sender = dict(
            self.users.get(from_id) or {"id": from_id, "is_bot": False, "first_name": "User"}
        )
        if is_bot:
            sender["is_bot"] = True
        message_id = chat.next_message_id
        chat.next_message_id += 1
        chat.message_ids.add(message_id)
        message: dict[str, Any] = {
            "message_id": message_id,
            "from": sender,
            "chat": chat.json(),
            "date": int(time.time()),
        }
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        if text is not None:
            if mention:
                text = f"@{BOT_USERNAME} {text}"
            message["text"] = text
            entities = []
            if text.startswith("/"):
                word = text.split(maxsplit=1)[0]
                entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(word)})
            for found in re.finditer(r"@[A-Za-z0-9_]{5,32}", text):
                if text.startswith("/") and found.start() < len(text.split(maxsplit=1)[0]):
                    continue  # the @bot of a /command is part of the command entity
                entities.append(
                    {
                        "type": "mention",
                        "offset": utf16_len(text[: found.start()]),
                        "length": utf16_len(found.group(0)),
                    }
                )
            if entities:
                message["entities"] = entities
        if reply_to_bot:
            message["reply_to_message"] = chat.last_bot_message or {
                "message_id": FIRST_BOT_MESSAGE_ID - 1,
                "from": self._me(),
                "chat": chat.json(),
                "date": int(time.time()),
                "text": "earlier",
            }
        message.update(extra)
        return message

    def push(
        self,
        chat_id: int,
        text: str,
        *,
        from_id: int,
        thread_id: int | None = None,
        reply_to_bot: bool = False,
        mention: bool = False,
        is_bot: bool = False,
    ) -> dict[str, Any]:
        """A user writes ``text``; returns the update (queued or POSTed to the webhook)."""
        message = self.message(
            chat_id,
            text,
            from_id=from_id,
            thread_id=thread_id,
            reply_to_bot=reply_to_bot,
            mention=mention,
            is_bot=is_bot,
        )
        return self._enqueue({"message": message})

    def push_kind(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Any update kind (``edited_message``, ``callback_query``, a photo ``message``)."""
        return self._enqueue({kind: obj})

    def push_raw(self, value: Any) -> None:
        """Any JSON as one element of the next `result` (hostile input, T18)."""
        if isinstance(value, dict) and type(value.get("update_id")) is int:
            self.next_id = max(self.next_id, value["update_id"] + 1)
        self.pending.append(value)
        self._wake()

    def _enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": self.next_id, **body}
        self.next_id += 1
        if self.webhook is not None:
            self._webhook_queue.append(update)
            self._webhook_wake.set()
        else:
            self.pending.append(update)
            self._wake()
        return update

    def backlog(self, n: int, chat_ids: list[int], *, from_id: int = 42) -> list[dict[str, Any]]:
        """``n`` text updates, round-robin over ``chat_ids`` (`msg <i>`)."""
        return [
            self.push(chat_ids[i % len(chat_ids)], f"msg {i}", from_id=from_id) for i in range(n)
        ]

    def outage(self, on: bool, mode: str = "net") -> None:
        """Every call fails (``net``: connection closed; ``502``: Bad Gateway) until off."""
        self.down = mode if on else None

    def block(self, chat_id: int) -> None:
        self.blocked.add(chat_id)

    def unblock(self, chat_id: int) -> None:
        self.blocked.discard(chat_id)

    def redeliver(self) -> None:
        """The next getUpdates returns the last batch again; a webhook gets the last 20."""
        if self.webhook is not None:
            self._webhook_queue.extend(self.webhook_sent[-20:])
            self._webhook_wake.set()
        else:
            self._redeliver = True
            self._wake()

    def on_confirm(self, callback: Callable[[int], None] | None) -> None:
        """Called with the offset whenever a getUpdates confirms new updates (T11)."""
        self.confirm_hook = callback

    def fail(self, method: str, *outcomes: str) -> None:
        self.scripted.setdefault(method.lower(), []).extend(outcomes)

    def reset(self) -> None:
        fresh = FakeTelegram(token=self.token)
        for name in (
            "chats",
            "users",
            "pending",
            "next_id",
            "confirmed_offset",
            "log",
            "sent",
            "scripted",
            "down",
            "blocked",
            "webhook",
            "last_batch",
            "webhook_sent",
            "webhook_answers",
            "confirm_hook",
            "_redeliver",
            "_webhook_queue",
        ):
            setattr(self, name, getattr(fresh, name))
        self._wake()

    def _wake(self) -> None:
        self._pushed.set()
        self._pushed = trio.Event()

    # -- reading --------------------------------------------------------------------

    def requests(
        self, method: str | None = None, chat_id: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.log
            if (method is None or entry["method"] == method)
            and (chat_id is None or _int(entry["params"].get("chat_id")) == chat_id)
        ]

    def texts(self, chat_id: int) -> list[str]:
        return list(self.sent.get(chat_id, []))

    def state(self) -> dict[str, Any]:
        return {
            "confirmed_offset": self.confirmed_offset,
            "pending_updates": len(self.pending) + len(self._webhook_queue),
            "webhook": None if self.webhook is None else dict(self.webhook),
        }

    # -- the Bot API ------------------------------------------------------------------

    def _me(self) -> dict[str, Any]:
        return {
            "id": BOT_ID,
            "is_bot": True,
            "first_name": "skydeck test",
            "username": BOT_USERNAME,
            "can_read_all_group_messages": False,
        }

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """One Bot API method: its result, or ApiError."""
        name = method.lower()
        handler = {
            "getme": self._get_me,
            "getupdates": self._get_updates,
            "sendmessage": self._send_message,
            "sendchataction": self._send_chat_action,
            "setwebhook": self._set_webhook,
            "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info,
        }.get(name)
        if handler is None:
            raise ApiError(404, "Not Found")
        return await handler(params)

    async def _get_me(self, params: dict[str, Any]) -> Any:
        return self._me()

    async def _get_updates(self, params: dict[str, Any]) -> Any:
        if self.webhook is not None:
            raise ApiError(409, CONFLICT_WEBHOOK)
        limit = _int(params.get("limit", 100))
        if limit is None or not 1 <= limit <= 100:
            limit = 100
        timeout = float(params.get("timeout") or 0)
        offset = _int(params.get("offset"))
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake()  # a getUpdates already waiting ends now, with 409
        if offset is not None:
            self._confirm(offset)
        deadline = trio.current_time() + timeout
        while True:
            if generation != self._poll_generation:
                raise ApiError(409, CONFLICT_POLL)
            if self._redeliver and self.last_batch:
                self._redeliver = False
                return list(self.last_batch)
            if self.pending:
                batch = self.pending[:limit]
                # Elements that can never be confirmed (no integer id) go out once.
                once = {id(item) for item in batch if _update_id(item) is None}
                if once:
                    self.pending = [item for item in self.pending if id(item) not in once]
                self.last_batch = batch
                return batch
            if trio.current_time() >= deadline:
                return []
            with trio.move_on_at(deadline):
                await self._pushed.wait()

    def _confirm(self, offset: int) -> None:
        before = len(self.pending)
        self.pending = [item for item in self.pending if (_update_id(item) or offset) >= offset]
        if offset > self.confirmed_offset:
            self.confirmed_offset = offset
        if len(self.pending) != before and self.confirm_hook is not None:
            self.confirm_hook(offset)

    async def _send_message(self, params: dict[str, Any]) -> Any:
        chat_id = _int(params.get("chat_id"))
        if chat_id is None or chat_id not in self.chats:
            raise ApiError(400, "Bad Request: chat not found")
        if chat_id in self.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        parse_mode = params.get("parse_mode")
        if parse_mode not in (None, "HTML"):
            raise ApiError(400, f"Bad Request: unsupported parse_mode {parse_mode}")
        shown = visible_html(text) if parse_mode == "HTML" else text
        if not shown.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(shown) > TEXT_LIMIT:
            raise ApiError(400, "Bad Request: message is too long")
        chat = self.chats[chat_id]
        reply = params.get("reply_parameters")
        if isinstance(reply, str):
            reply = json.loads(reply)
        target = _int(reply.get("message_id")) if isinstance(reply, dict) else None
        lenient = isinstance(reply, dict) and bool(reply.get("allow_sending_without_reply"))
        if target is None and params.get("reply_to_message_id") is not None:
            target = _int(params.get("reply_to_message_id"))
            lenient = bool(params.get("allow_sending_without_reply"))
        if target is not None and target not in chat.message_ids and not lenient:
            raise ApiError(400, "Bad Request: message to be replied not found")
        message_id = chat.next_bot_message_id
        chat.next_bot_message_id += 1
        chat.message_ids.add(message_id)
        message: dict[str, Any] = {
            "message_id": message_id,
            "from": self._me(),
            "chat": chat.json(),
            "date": int(time.time()),
            "text": shown,
        }
        if params.get("message_thread_id") is not None:
            message["message_thread_id"] = _int(params["message_thread_id"])
        chat.last_bot_message = message
        self.sent.setdefault(chat_id, []).append(shown)
        return message

    async def _send_chat_action(self, params: dict[str, Any]) -> Any:
        chat_id = _int(params.get("chat_id"))
        if chat_id is None or chat_id not in self.chats:
            raise ApiError(400, "Bad Request: chat not found")
        if params.get("action") not in CHAT_ACTIONS:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    async def _set_webhook(self, params: dict[str, Any]) -> Any:
        url = params.get("url")
        if not isinstance(url, str) or not url:
            return await self._delete_webhook(params)
        secret = params.get("secret_token")
        if secret is not None and (not isinstance(secret, str) or not SECRET.match(secret)):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        self.webhook = {
            "url": url,
            "secret_token": secret,
            "allowed_updates": params.get("allowed_updates"),
            "max_connections": params.get("max_connections"),
            "drop_pending_updates": params.get("drop_pending_updates"),
        }
        self._poll_generation += 1  # a waiting getUpdates ends
        self._webhook_queue.extend(item for item in self.pending if isinstance(item, dict))
        self.pending = []
        self._webhook_wake.set()
        self._wake()
        return True

    async def _delete_webhook(self, params: dict[str, Any]) -> Any:
        if self.webhook is not None:
            self.pending.extend(self._webhook_queue)
            self._webhook_queue = []
        self.webhook = None
        if params.get("drop_pending_updates"):
            self.pending = []
        return True

    async def _get_webhook_info(self, params: dict[str, Any]) -> Any:
        hook = self.webhook or {}
        return {
            "url": hook.get("url", ""),
            "has_custom_certificate": False,
            "pending_update_count": len(self._webhook_queue) + len(self.pending),
            "max_connections": hook.get("max_connections"),
            "allowed_updates": hook.get("allowed_updates"),
        }

    async def run_webhook(self) -> None:
        """POST queued updates to the webhook, one at a time, in order (max_connections 1)."""
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                if self.webhook is None or not self._webhook_queue:
                    self._webhook_wake = trio.Event()
                    await self._webhook_wake.wait()
                    continue
                hook = self.webhook
                update = self._webhook_queue.pop(0)
                headers = {"Content-Type": "application/json"}
                if hook.get("secret_token"):
                    headers["X-Telegram-Bot-Api-Secret-Token"] = hook["secret_token"]
                for attempt in range(1, 6):
                    try:
                        answer = await client.post(hook["url"], json=update, headers=headers)
                        status: int | None = answer.status_code
                    except httpx.HTTPError:
                        status = None
                    self.webhook_answers.append(status)
                    if status is not None and 200 <= status < 300:
                        break
                    await trio.sleep(0.1 * attempt)
                self.webhook_sent.append(update)

    # -- HTTP -----------------------------------------------------------------------

    def _outcome(self, name: str) -> str | None:
        if self.down is not None:
            return "net" if self.down == "net" else "502"
        queue = self.scripted.get(name)
        return queue.pop(0) if queue else None

    def app(self) -> QuartTrio:
        app = QuartTrio("fake-telegram")
        fake = self

        @app.route("/bot<token>/<method>", methods=["GET", "POST"])
        async def bot_api(token: str, method: str) -> Any:
            params: dict[str, Any] = dict(request.args)
            body = await request.get_data(as_text=False)
            if body:
                if (request.content_type or "").startswith("application/json"):
                    try:
                        decoded = json.loads(body)
                    except ValueError:
                        return _answer_error(ApiError(400, "Bad Request: invalid JSON"))
                    if isinstance(decoded, dict):
                        params.update(decoded)
                else:
                    params.update((await request.form).to_dict())
            entry = {
                "method": method,
                "params": params,
                "code": 200,
                "at": time.monotonic(),
                "http": request.method,
                "json": (request.content_type or "").startswith("application/json"),
            }
            fake.log.append(entry)
            if token != fake.token:
                entry["code"] = 401
                return _answer_error(ApiError(401, "Unauthorized"))
            outcome = fake._outcome(method.lower())
            try:
                if outcome is not None:
                    special = await _scripted(outcome, entry)
                    if special is not None:
                        return special
                result = await fake.call(method, params)
            except ApiError as exc:
                entry["code"] = exc.code
                return _answer_error(exc)
            return {"ok": True, "result": result}

        @app.route("/_fake/<name>", methods=["GET", "POST"])
        async def control(name: str) -> Any:
            if request.method == "GET":
                if name == "requests":
                    chat = request.args.get("chat_id")
                    return {
                        "requests": fake.requests(
                            request.args.get("method") or None, int(chat) if chat else None
                        )
                    }
                if name == "state":
                    return fake.state()
                if name == "texts":
                    return {"texts": fake.texts(int(request.args["chat_id"]))}
                return {"error": "unknown"}, 404
            kwargs = await request.get_json(silent=True) or {}
            allowed = {
                "chat",
                "user",
                "push",
                "push_kind",
                "push_raw",
                "backlog",
                "outage",
                "block",
                "unblock",
                "redeliver",
                "fail",
                "reset",
            }
            if name not in allowed:
                return {"error": "unknown"}, 404
            if name == "fail":
                fake.fail(kwargs["method"], *kwargs.get("outcomes", []))
                return {"ok": True}
            result = getattr(fake, name)(**kwargs)
            return {"ok": True, "result": result}

        @app.before_serving
        async def start_webhook() -> None:
            app.nursery.start_soon(fake.run_webhook)

        return app


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value):
        return int(value)
    return None


def _update_id(item: Any) -> int | None:
    if isinstance(item, dict) and type(item.get("update_id")) is int:
        return int(item["update_id"])
    return None


def _answer_error(exc: ApiError) -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {"ok": False, "error_code": exc.code, "description": exc.description}
    if exc.parameters:
        body["parameters"] = exc.parameters
    return body, exc.code


async def _scripted(outcome: str, entry: dict[str, Any]) -> Any:
    """A scripted failure's answer, or None to answer normally (after ``slow``)."""
    kind, _, arg = outcome.partition(":")
    codes = {
        "409": 409,
        "500": 500,
        "502": 502,
        "502html": 502,
        "401": 401,
        "garbage": 200,
        "shape": 200,
    }
    entry["code"] = codes.get(kind, int(kind) if kind.isdigit() else 0)
    if kind == "slow":
        entry["code"] = 200
        await trio.sleep(float(arg))
        return None
    if kind == "429":
        seconds = int(arg or 5)
        raise ApiError(429, f"Too Many Requests: retry after {seconds}", {"retry_after": seconds})
    if kind == "500":
        raise ApiError(500, "Internal Server Error")
    if kind == "409":
        raise ApiError(409, CONFLICT_POLL)
    if kind == "502":
        raise ApiError(502, "Bad Gateway")
    if kind == "502html":
        return Response("<html><body>502 Bad Gateway</body></html>", 502, content_type="text/html")
    if kind == "401":
        raise ApiError(401, "Unauthorized")
    if kind == "garbage":
        return Response("<html>hello</html>", 200, content_type="text/html")
    if kind == "shape":
        return {"ok": True, "result": "oops"}
    if kind == "400":
        if arg == "parse":
            raise ApiError(400, "Bad Request: can't parse entities: unsupported start tag")
        if arg == "long":
            raise ApiError(400, "Bad Request: message is too long")
        if arg.startswith("migrate:"):
            new_id = int(arg.split(":", 1)[1])
            raise ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": new_id},
            )
        raise ApiError(400, f"Bad Request: {arg or 'scripted'}")
    if kind == "403":
        raise ApiError(403, "Forbidden: bot was blocked by the user")
    raise ValueError(f"unknown scripted outcome {outcome!r}")


def asgi(fake: FakeTelegram) -> Any:
    """The app, with ``net`` outcomes as a connection cut mid-answer: the status
    line goes out with a Content-Length the body never reaches, so the client
    sees the connection close unanswered (a network error, no usable status)."""
    app = fake.app()

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        match = re.fullmatch(r"/bot([^/]*)/([^/]+)", str(scope.get("path", "")))
        if scope["type"] == "http" and match and match.group(1) == fake.token:
            method = match.group(2)
            queue = fake.scripted.get(method.lower())
            if fake.down == "net" or (fake.down is None and queue and queue[0] == "net"):
                if fake.down is None and queue:
                    queue.pop(0)
                body = b""
                while True:
                    message = await receive()
                    body += message.get("body", b"")  # type: ignore[operator]
                    if not message.get("more_body"):
                        break
                try:
                    params = json.loads(body) if body else {}
                except ValueError:
                    params = {}
                fake.log.append(
                    {"method": method, "params": params, "code": None, "at": time.monotonic()}
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", b"1000")],
                        "trailers": False,
                    }
                )
                await send({"type": "http.response.body", "body": b"{", "more_body": False})
                return
        await app(scope, receive, send)

    return wrapped


@asynccontextmanager
async def serving(fake: FakeTelegram, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run the fake on a real loopback socket for the block; yields its base URL."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve, asgi(fake), config)
        yield url
        nursery.cancel_scope.cancel()


async def _main(host: str, port: int, token: str) -> None:
    fake = FakeTelegram(token=token)
    async with serving(fake, host, port) as url:
        print(f"fake-telegram listening on {url}", flush=True)
        await trio.sleep_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=TOKEN)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the fake binds loopback only")
    trio.run(_main, args.host, args.port, args.token)


if __name__ == "__main__":
    main()
