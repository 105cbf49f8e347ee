"""Telegram's HTTP routes (telegram.md §9, T14): links, pairings, the outbox, and
the webhook Telegram posts to. Parse and validate here; the rows are
`TelegramStore`'s, the pairing and the webhook the transport's.

The link routes work with Telegram off (no token): links can be set up before
the bot is.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Literal, cast

from quart import Blueprint, request
from werkzeug.exceptions import UnsupportedMediaType

from .. import validate
from ..errors import BadRequest, NotFound, Unavailable
from ..guard import NOT_JSON, is_json
from .telegram import WEBHOOK_PATH, iso, pair
from .telegram_store import TelegramStore

if TYPE_CHECKING:
    from ..store import Store
    from .telegram import TelegramReceiver

Json = tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]
CHAT_ID = re.compile(r"^-?[0-9]{1,16}$")
USER_ID = re.compile(r"^[0-9]{1,20}$")
MAX_ALLOWED_USERS = 1000
LINK_FIELDS = {"chat_id", "channel", "topic_id", "trigger", "deliver", "allow_users"}
PATCH_FIELDS = {"channel", "trigger", "deliver", "allow_users"}
PAIR_FIELDS = {"code", "channel", "trigger", "deliver"}


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise BadRequest(f"unknown field {key!r}", field=key)


def _whole(value: Any) -> Any:
    """JSON's one number type: ``5.0`` is the integer 5 (validate.py does the same)."""
    whole = validate.json_integer(value)
    return value if whole is None else whole


def _chat_id(value: Any) -> int:
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or not CHAT_ID.match(str(value)):
        raise BadRequest(
            "chat_id must be an integer or a decimal string of at most 16 digits", field="chat_id"
        )
    return int(value)


def _topic(body: dict[str, Any]) -> int | None:
    if "topic_id" not in body:
        return None
    value = _whole(body["topic_id"])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest("topic_id must be a positive integer", field="topic_id")
    return value


def _choice(body: dict[str, Any], key: str, options: tuple[str, ...]) -> str | None:
    if key not in body:
        return None
    value = body[key]
    if not isinstance(value, str) or value not in options:
        raise BadRequest(f"{key} must be one of {', '.join(options)}", field=key)
    return str(value)


def _allow(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    bad = BadRequest(
        f"allow_users must be a list of at most {MAX_ALLOWED_USERS} user ids", field="allow_users"
    )
    if not isinstance(value, list) or len(value) > MAX_ALLOWED_USERS:
        raise bad
    out = []
    for item in map(_whole, value):
        if (
            isinstance(item, bool)
            or not isinstance(item, int | str)
            or not USER_ID.match(str(item))
        ):
            raise bad
        out.append(str(item))
    return tuple(out)


def _trigger_for(chat_id: int, trigger: str | None) -> Literal["all", "mention"]:
    if chat_id > 0:
        if trigger == "mention":
            raise BadRequest("a private chat takes trigger all only", field="trigger")
        return "all"
    return cast(Literal["all", "mention"], trigger or "mention")


def blueprint(store: Store, rows: TelegramStore, receiver: TelegramReceiver | None) -> Blueprint:
    routes = Blueprint("telegram", __name__)

    async def body_of() -> dict[str, Any]:
        if not is_json(request.headers.get("Content-Type")):
            raise UnsupportedMediaType(NOT_JSON.message)  # 415, as the app's own routes
        raw = await request.get_data(as_text=False)
        assert isinstance(raw, bytes)
        return validate.json_object(raw)

    @routes.get("/api/telegram/links")
    async def list_links() -> Json:
        channel = request.args.get("channel")
        if channel is not None:
            validate.name(channel, "channel")
        return {"links": [link.to_json() for link in rows.links(channel)]}

    @routes.post("/api/telegram/links")
    async def create_link() -> Json:
        body = await body_of()
        _unknown(body, LINK_FIELDS)
        chat_id = _chat_id(body.get("chat_id"))
        channel = validate.name(body.get("channel"), "channel")
        topic = _topic(body)
        trigger = _trigger_for(chat_id, _choice(body, "trigger", ("all", "mention")))
        deliver = cast(
            Literal["all", "origin"], _choice(body, "deliver", ("all", "origin")) or "all"
        )
        link = rows.add_link(
            chat_id=chat_id,
            topic_id=topic,
            channel=channel,
            trigger=trigger,
            deliver=deliver,
            allow_users=_allow(body.get("allow_users")),
        )
        await store.flushed()
        return link.to_json(), 201

    @routes.patch("/api/telegram/links/<lid>")
    async def patch_link(lid: str) -> Json:
        current = rows.link(lid)
        if current is None:
            raise NotFound(f"no link with id {lid!r}", field="id")
        body = await body_of()
        _unknown(body, PATCH_FIELDS)
        changes: dict[str, Any] = {}
        if "channel" in body:
            changes["channel"] = validate.name(body["channel"], "channel")
        if "trigger" in body:
            changes["trigger"] = _trigger_for(
                current.chat_id, _choice(body, "trigger", ("all", "mention"))
            )
        if "deliver" in body:
            changes["deliver"] = _choice(body, "deliver", ("all", "origin")) or "all"
        if "allow_users" in body:
            changes["allow_users"] = _allow(body["allow_users"])
        link = rows.update_link(lid, changes)
        await store.flushed()
        return link.to_json()

    @routes.delete("/api/telegram/links/<lid>")
    async def delete_link(lid: str) -> Json:
        rows.delete_link(lid)
        await store.flushed()
        return {"ok": True}

    @routes.get("/api/telegram/pairings")
    async def list_pairings() -> Json:
        pairings = [
            {
                "code": p["code"],
                "chat_id": str(p["chat_id"]),
                "topic_id": p["topic_id"],
                "chat_type": p["chat_type"],
                "title": p["title"],
                "user": p["user"],
                "expires_at": iso(p["expires_at"]),
            }
            for p in rows.pairings(time.time())
        ]
        return {"pairings": pairings}

    @routes.post("/api/telegram/pair")
    async def pair_chat() -> Json:
        body = await body_of()
        _unknown(body, PAIR_FIELDS)
        code = body.get("code")
        if not isinstance(code, str) or not code:
            raise BadRequest("code must be the pairing code the chat got", field="code")
        channel = validate.name(body.get("channel"), "channel")
        trigger = cast(
            Literal["all", "mention"] | None, _choice(body, "trigger", ("all", "mention"))
        )
        deliver = cast(
            Literal["all", "origin"], _choice(body, "deliver", ("all", "origin")) or "all"
        )
        link = pair(rows, code, channel, trigger, deliver)
        await store.flushed()
        if receiver is not None:
            receiver.sender.wake()
        return link.to_json(), 201

    @routes.get("/api/telegram/outbox")
    async def outbox() -> Json:
        return {"items": [row.to_json() for row in rows.outbox(time.time())]}

    @routes.post(WEBHOOK_PATH)
    async def webhook() -> Json:
        """T14: exempt from bearer auth; the secret header is checked before the body is read."""
        if receiver is None or receiver.config.mode != "webhook":
            raise NotFound("this daemon does not take Telegram webhooks")
        if not receiver.authorized(request.headers.get("X-Telegram-Bot-Api-Secret-Token")):
            return {"ok": False, "error": "unauthorized"}, 401, {"Connection": "close"}
        if receiver.stopping or not receiver.registry.accepting:
            raise Unavailable("skydeck is shutting down; Telegram sends the update again")
        raw = await request.get_data(as_text=False)
        assert isinstance(raw, bytes)
        return await receiver.webhook(raw)

    return routes
