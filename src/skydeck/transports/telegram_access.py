"""Who gets in, decided in pure code (telegram.md T4-T8, T15-T18, T21).

`parse` turns one element of a `getUpdates` result (or a webhook body) into a
`TgMessage`, or says why it carries none; `decide` takes that message, the
links and the bot's identity and answers what the receiver must do: store it
(`Accept`), run a command, send a notice, offer pairing, or nothing. The
receiver (telegram.py) carries the answer out in the update's transaction;
nothing here touches the network or the store.

Fail closed (T5): no link, no access. A message is stored only if its chat (or
forum topic) is linked, its sender is a person the link admits, and, in a group
on ``trigger: mention``, it is addressed to the bot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_TEXT = 16_384
#: T17: the first field present names what was sent, in this order.
MEDIA_KINDS: tuple[tuple[str, str], ...] = (
    ("animation", "GIF"),
    ("photo", "photo"),
    ("document", "file"),
    ("audio", "audio file"),
    ("voice", "voice message"),
    ("video", "video"),
    ("video_note", "video message"),
    ("sticker", "sticker"),
    ("location", "location"),
    ("venue", "location"),
    ("contact", "contact"),
    ("poll", "poll"),
    ("dice", "message"),
    ("game", "message"),
    ("story", "message"),
    ("paid_media", "message"),
)
#: Service messages (T16): members, pins, titles, topic events, ...
SERVICE_FIELDS = frozenset(
    {
        "new_chat_members",
        "left_chat_member",
        "new_chat_title",
        "new_chat_photo",
        "delete_chat_photo",
        "group_chat_created",
        "supergroup_chat_created",
        "channel_chat_created",
        "message_auto_delete_timer_changed",
        "migrate_from_chat_id",
        "pinned_message",
        "forum_topic_created",
        "forum_topic_edited",
        "forum_topic_closed",
        "forum_topic_reopened",
        "general_forum_topic_hidden",
        "general_forum_topic_unhidden",
        "video_chat_started",
        "video_chat_ended",
        "video_chat_scheduled",
        "video_chat_participants_invited",
        "write_access_allowed",
        "users_shared",
        "chat_shared",
        "boost_added",
    }
)
OUR_COMMANDS = frozenset({"start", "help", "reset", "status"})
PAIRING_COMMANDS = frozenset({"start", "pair"})


@dataclass(frozen=True, slots=True)
class Bot:
    id: int
    username: str


@dataclass(frozen=True, slots=True)
class LinkView:
    """What access needs of a link (the store's row has more)."""

    id: str
    channel: str
    trigger: Literal["all", "mention"]
    allow_users: tuple[str, ...] | None
    chat_type: str | None = None


@dataclass(frozen=True, slots=True)
class TgMessage:
    update_id: int
    chat_id: int
    message_id: int
    chat_type: str
    title: str | None
    topic_id: int | None
    text: str | None
    entities: tuple[dict[str, Any], ...]
    from_id: int | None
    from_is_bot: bool
    user: str
    sender_chat: bool
    reply_to_from_id: int | None
    media: str | None
    service: bool
    migrate_to: int | None


@dataclass(frozen=True, slots=True)
class Skipped:
    """An update with no message to act on: counted, acknowledged, nothing else."""

    outcome: Literal["ignored", "malformed"]


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def update_id(element: Any) -> int | None:
    """T18: the element's integer `update_id`, or None (which fails the whole poll)."""
    return _int(element.get("update_id")) if isinstance(element, dict) else None


def parse(element: dict[str, Any]) -> TgMessage | Skipped:
    """One update (with an integer `update_id`) as a message, or why it is none."""
    uid = element["update_id"]
    if "message" not in element:
        return Skipped("ignored")  # edited_message, channel_post, callback_query, ... (T16)
    raw = element["message"]
    if not isinstance(raw, dict):
        return Skipped("malformed")
    chat = raw.get("chat")
    chat_id = _int(chat.get("id")) if isinstance(chat, dict) else None
    message_id = _int(raw.get("message_id"))
    text = raw.get("text")
    if chat_id is None or message_id is None or not isinstance(chat, dict):
        return Skipped("malformed")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
        return Skipped("malformed")
    caption = raw.get("caption")
    sender = raw.get("from")
    sender = sender if isinstance(sender, dict) else None
    reply_to = raw.get("reply_to_message")
    reply_from = reply_to.get("from") if isinstance(reply_to, dict) else None
    entities_raw = raw.get("entities") if text is not None else raw.get("caption_entities")
    entities = (
        tuple(e for e in entities_raw or () if isinstance(e, dict))
        if isinstance(entities_raw, list)
        else ()
    )
    media = next((name for key, name in MEDIA_KINDS if key in raw), None)
    if media is None and text is None and caption is None and not _is_service(raw):
        media = "message"  # some content this Bot API version did not know yet
    topic = _int(raw.get("message_thread_id")) if raw.get("is_topic_message") else None
    return TgMessage(
        update_id=uid,
        chat_id=chat_id,
        message_id=message_id,
        chat_type=str(chat.get("type") or ("private" if chat_id > 0 else "group")),
        title=chat.get("title") if isinstance(chat.get("title"), str) else None,
        topic_id=topic,
        text=text if text is not None else (caption if isinstance(caption, str) else None),
        entities=entities,
        from_id=_int(sender.get("id")) if sender else None,
        from_is_bot=bool(sender.get("is_bot")) if sender else False,
        user=_display(sender),
        sender_chat="sender_chat" in raw,
        reply_to_from_id=_int(reply_from.get("id")) if isinstance(reply_from, dict) else None,
        media=media,
        service=_is_service(raw),
        migrate_to=_int(raw.get("migrate_to_chat_id")),
    )


def _is_service(raw: dict[str, Any]) -> bool:
    return any(key in raw for key in SERVICE_FIELDS) or "migrate_to_chat_id" in raw


def _display(sender: dict[str, Any] | None) -> str:
    if not sender:
        return ""
    if isinstance(sender.get("username"), str) and sender["username"]:
        return f"@{sender['username']}"
    names = [sender.get("first_name"), sender.get("last_name")]
    return " ".join(name for name in names if isinstance(name, str) and name)


# -- decisions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    link: LinkView
    content: str


@dataclass(frozen=True, slots=True)
class Command:
    link: LinkView
    name: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    link: LinkView
    kind: str


@dataclass(frozen=True, slots=True)
class Unlinked:
    """No link: the update is only acknowledged; ``pairing`` offers a code (T8)."""

    pairing: bool


@dataclass(frozen=True, slots=True)
class Migrate:
    """T20: the group became a supergroup; its links move to ``to``."""

    to: int


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str = field(default="ignored")


Decision = Accept | Command | Unsupported | Unlinked | Migrate | Ignore


def link_for(
    links: Mapping[tuple[int, int | None], LinkView], chat_id: int, topic_id: int | None
) -> LinkView | None:
    """T4: the topic's own link, else the chat's."""
    if topic_id is not None and (chat_id, topic_id) in links:
        return links[(chat_id, topic_id)]
    return links.get((chat_id, None))


def _span(text: str, entity: dict[str, Any]) -> tuple[int, int] | None:
    """An entity's (start, end) as Python indexes (entities count UTF-16 units)."""
    offset, length = _int(entity.get("offset")), _int(entity.get("length"))
    if offset is None or length is None or offset < 0 or length < 0:
        return None
    units = 0
    start = end = None
    for index, ch in enumerate(text):
        if units == offset:
            start = index
        if units == offset + length:
            end = index
            break
        units += 2 if ord(ch) > 0xFFFF else 1
    if start is None and units == offset:
        start = len(text)
    if end is None and units == offset + length:
        end = len(text)
    return None if start is None or end is None else (start, end)


def command_of(message: TgMessage, bot: Bot) -> tuple[str, bool] | None:
    """T21: (command name, ours) when the first entity is a bot_command at offset 0;
    ours is False for ``/cmd@another_bot``."""
    if not message.text or not message.entities:
        return None
    first = message.entities[0]
    if first.get("type") != "bot_command" or first.get("offset") != 0:
        return None
    span = _span(message.text, first)
    if span is None:
        return None
    word = message.text[span[0] + 1 : span[1]]
    name, _, target = word.partition("@")
    return name.lower(), (not target or target.lower() == bot.username.lower())


def _mentions(message: TgMessage, bot: Bot) -> list[tuple[int, int]]:
    spans = []
    handle = f"@{bot.username}".lower()
    for entity in message.entities:
        if entity.get("type") != "mention" or not message.text:
            continue
        span = _span(message.text, entity)
        if span is not None and message.text[span[0] : span[1]].lower() == handle:
            spans.append(span)
    return spans


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + text[end:]
    return text.strip()


def decide(
    message: TgMessage,
    links: Mapping[tuple[int, int | None], LinkView],
    bot: Bot,
    *,
    pairing: bool,
) -> Decision:
    """What the receiver does with ``message`` (T5-T8, T16, T17, T20, T21)."""
    if message.migrate_to is not None:
        return Migrate(message.migrate_to)
    if message.service:
        return Ignore()
    if message.from_id is None or message.from_is_bot or message.sender_chat:
        return Ignore()  # T6: no person to answer
    command = command_of(message, bot)
    if command is not None and not command[1]:
        return Ignore()  # T21: another bot's command
    link = link_for(links, message.chat_id, message.topic_id)
    if link is None:
        private = message.chat_type == "private"
        asks = command is not None and command[0] in PAIRING_COMMANDS
        return Unlinked(pairing=pairing and (private or asks))
    if link.allow_users is not None and str(message.from_id) not in link.allow_users:
        return Ignore()
    mentions = _mentions(message, bot)
    addressed = (
        link.trigger == "all"
        or message.chat_type == "private"
        or command is not None
        or bool(mentions)
        or message.reply_to_from_id == bot.id
    )
    if not addressed:
        return Ignore()
    if message.media is not None:
        return Unsupported(link, message.media)
    if command is not None and command[0] in OUR_COMMANDS:
        return Command(link, command[0])
    text = message.text or ""
    verbatim = link.trigger == "all" or message.chat_type == "private"
    content = text if verbatim or not mentions else _without(text, mentions)
    if not content.strip():
        return Ignore()
    return Accept(link, content)


def metadata(message: TgMessage) -> dict[str, str]:
    """T15: the inbound message's metadata, all strings; the author is here, not
    in the prompt."""
    out = {
        "source": "telegram",
        "telegram_chat_id": str(message.chat_id),
        "telegram_message_id": str(message.message_id),
        "telegram_update_id": str(message.update_id),
        "telegram_chat_type": message.chat_type,
        "telegram_user_id": str(message.from_id),
        "telegram_user": message.user,
    }
    if message.topic_id is not None:
        out["telegram_topic_id"] = str(message.topic_id)
    return out


def external_id(chat_id: int, message_id: int) -> str:
    """R8's key: one Telegram message is one inbound message, however often it comes."""
    return f"tg:{chat_id}:{message_id}"
