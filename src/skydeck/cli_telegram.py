"""``skydeck telegram ...``: links, pairing and status over the daemon's HTTP API
(telegram.md §9), with the conventions of the other commands (one line per
error, ``--json``)."""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cli import Client


TRIGGER = "groups: every message (all) or only those addressed to the bot (mention, default)"
DELIVER = "replies to other sources' messages too (all, default) or only to this chat's (origin)"


def _link_line(link: dict[str, Any]) -> str:
    flags = [link["trigger"], f"deliver {link['deliver']}"]
    if link.get("allow_users") is not None:
        flags.append(f"{len(link['allow_users'])} allowed users")
    if link.get("blocked_at"):
        flags.append(f"blocked since {link['blocked_at']}")
    title = f" ({link['title']})" if link.get("title") else ""
    return f"{link['id']:<24} -> {link['channel']:<16} {', '.join(flags)}{title}"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .cli import _actions, _command

    pair_example = "skydeck telegram pair K7M2QX --channel support"
    telegram = _command(
        commands,
        "telegram",
        "link Telegram chats to channels, pair chats, show the bot's status",
        pair_example,
        "skydeck telegram link -1001234567890 --channel ops --topic 7",
    )
    actions = _actions(telegram, "telegram_cmd")
    link = _command(
        actions,
        "link",
        "link a chat (or a topic of it) to a channel",
        "skydeck telegram link 123456789 --channel support",
        "skydeck telegram link -1001234567890 --channel ops --topic 7 --trigger all",
    )
    link.add_argument("chat_id", help="the chat's id (negative for groups)")
    link.add_argument("--channel", metavar="CH", required=True, help="the channel it talks to")
    link.add_argument("--topic", metavar="N", type=int, help="a forum topic's id")
    link.add_argument("--trigger", choices=("all", "mention"), help=TRIGGER)
    link.add_argument("--deliver", choices=("all", "origin"), help=DELIVER)
    link.add_argument(
        "--allow-user", metavar="ID", action="append", help="only these users (repeatable)"
    )
    link.add_argument("--json", action="store_true", help="print raw JSON")
    ls = _command(actions, "ls", "list links, oldest first", "skydeck telegram ls")
    ls.add_argument("--json", action="store_true", help="print raw JSON")
    unlink = _command(actions, "unlink", "remove a link", "skydeck telegram unlink 123456789")
    unlink.add_argument("id", help="the link id (<chat_id> or <chat_id>:<topic_id>)")
    # A group's link id is negative ("-100123:7"): a value, not an option. argparse
    # only knows plain negative numbers as values; teach this parser the topic form.
    unlink._negative_number_matcher = re.compile(r"^-\d+(?::\d+)?$")
    pairings = _command(
        actions, "pairings", "list chats waiting to be paired", "skydeck telegram pairings"
    )
    pairings.add_argument("--json", action="store_true", help="print raw JSON")
    pair = _command(actions, "pair", "link the chat that got this pairing code", pair_example)
    pair.add_argument("code", help="the code the chat got from the bot")
    pair.add_argument("--channel", metavar="CH", required=True, help="the channel it talks to")
    pair.add_argument("--trigger", choices=("all", "mention"), help=TRIGGER)
    pair.add_argument("--deliver", choices=("all", "origin"), help=DELIVER)
    pair.add_argument("--json", action="store_true", help="print raw JSON")
    status = _command(
        actions, "status", "print the telegram block of /health", "skydeck telegram status"
    )
    status.add_argument("--json", action="store_true", help="print raw JSON")


def run(args: argparse.Namespace, client: Client) -> int:
    from .cli import CliError

    command = args.telegram_cmd
    if command in ("link", "pair"):
        body: dict[str, Any] = {"channel": args.channel}
        if command == "link":
            body["chat_id"] = args.chat_id
            if args.topic is not None:
                body["topic_id"] = args.topic
            if args.allow_user:
                body["allow_users"] = args.allow_user
        else:
            body["code"] = args.code
        for key in ("trigger", "deliver"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        path = "/api/telegram/links" if command == "link" else "/api/telegram/pair"
        made = client.request("POST", path, body)
        print(json.dumps(made, indent=2) if args.json else f"linked {_link_line(made)}")
    elif command == "ls":
        links = client.request("GET", "/api/telegram/links")["links"]
        if args.json:
            print(json.dumps(links, indent=2))
        elif not links:
            print("no links; pair a chat with `skydeck telegram pair CODE --channel CH`")
        for item in [] if args.json else links:
            print(_link_line(item))
    elif command == "unlink":
        client.request("DELETE", f"/api/telegram/links/{args.id}")
        print(f"unlinked {args.id}")
    elif command == "pairings":
        waiting = client.request("GET", "/api/telegram/pairings")["pairings"]
        if args.json:
            print(json.dumps(waiting, indent=2))
        elif not waiting:
            print("no chat is waiting to be paired")
        for item in [] if args.json else waiting:
            who = item.get("title") or item.get("user") or item["chat_id"]
            print(f"{item['code']}  chat {item['chat_id']} ({who}), expires {item['expires_at']}")
    else:
        health = client.request("GET", "/health")
        block = health.get("telegram")
        if block is None:
            raise CliError("Telegram is off on this daemon (no SKYDECK_TELEGRAM_TOKEN)")
        if args.json:
            print(json.dumps(block, indent=2))
        else:
            for key, value in block.items():
                print(f"{key:<17} {value if value is not None else '-'}")
    return 0
