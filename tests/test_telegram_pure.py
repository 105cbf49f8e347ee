"""The pure halves of the Telegram transport: chunking and HTML (T27, T28, as
hypothesis properties too), update parsing and access decisions (T4-T8, T15-T18,
T21), and the configuration checks (T1, T3)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_telegram import BOT_ID, BOT_USERNAME, ApiError, FakeTelegram, visible_html
from skydeck.transports import telegram_access as access
from skydeck.transports.telegram import load_config
from skydeck.transports.telegram_format import chunk, to_html, utf16_units

BOT = access.Bot(id=BOT_ID, username=BOT_USERNAME)


def squash(text: str) -> str:
    """Text without whitespace and without fence markers (which a cut may add)."""
    return re.sub(r"```[^\s`]*", "", re.sub(r"\s+", "", text))


# -- T27 ------------------------------------------------------------------------------

TOKENS = [*"ab c\n😀é`", "```", "```py\n", "\n```\n", "\n\n", "x" * 50]
TEXT = st.lists(st.sampled_from(TOKENS), max_size=600).map(lambda s: "".join(s) * 3)
FENCE_LINE = re.compile(r"^ {0,3}```", re.M)


@given(TEXT)
@settings(max_examples=150, deadline=None)
def test_t27_parts_fit_keep_the_text_and_balance_fences(text: str) -> None:
    parts = chunk(text, reply_id="R1", limit=512)
    assert all(utf16_units(part) <= 512 for part in parts)
    if len(parts) < 20:
        assert squash("".join(parts)) == squash(text)
    for part in parts[:-1]:
        assert len(FENCE_LINE.findall(part)) % 2 == 0, part


def test_t27_ten_thousand_a() -> None:
    assert [len(p) for p in chunk("a" * 10_000)] == [4096, 4096, 1808]


def test_t27_boundaries_blank_line_first_and_separator_dropped() -> None:
    text = "a" * 3000 + "\n\n" + "b" * 500 + "\n" + "c" * 2000
    parts = chunk(text)
    assert parts == ["a" * 3000, "b" * 500 + "\n" + "c" * 2000]
    spaced = ("word " * 1000).strip()
    assert all(not p.startswith(" ") and not p.endswith(" ") for p in chunk(spaced))


def test_t27_never_splits_a_surrogate_pair() -> None:
    parts = chunk("😀" * 3000)  # 6000 units
    assert [utf16_units(p) for p in parts] == [4096, 1904]


def test_t27_a_block_cut_in_the_middle_is_closed_and_reopened() -> None:
    code = "\n".join(f"line {i}" for i in range(1000))
    parts = chunk(f"intro\n```py\n{code}\n```\nafter")
    assert len(parts) == 3
    assert parts[0].endswith("\n```") and parts[1].startswith("```py\n")
    assert all(p.count("```") % 2 == 0 for p in parts)
    assert parts[-1].endswith("```\nafter")


def test_t27_a_block_opening_in_the_second_half_moves_to_the_next_part() -> None:
    text = "x " * 1500 + "\n```sh\n" + "echo hi\n" * 400 + "```"
    parts = chunk(text)
    assert parts[0] == "x " * 1500  # the line break before the fence is the separator
    assert parts[1].startswith("```sh\n")


def test_t27_at_most_twenty_parts_the_last_one_says_where_the_rest_is() -> None:
    parts = chunk("a" * 100_000, reply_id="m-1")
    assert len(parts) == 20
    left = 100_000 - 19 * 4096
    assert parts[-1] == (
        f"[reply truncated: {left} more characters; the full text is message m-1 in skydeck]"
    )


# -- T28 ------------------------------------------------------------------------------


def test_t28_the_spec_example() -> None:
    source = "Use `x<y` & **b**\n```py\nif a<b:\n    pass\n```"
    assert to_html(source) == (
        "Use <code>x&lt;y</code> &amp; <b>b</b>\n"
        '<pre><code class="language-py">if a&lt;b:\n    pass</code></pre>'
    )


def test_t28_links_headings_plain_blocks_and_no_italics() -> None:
    assert to_html('[docs](https://x.y/?a=1&b="2")') == (
        '<a href="https://x.y/?a=1&amp;b=&quot;2&quot;">docs</a>'
    )
    assert to_html("[bad](javascript:alert(1))") == "[bad](javascript:alert(1))"
    assert to_html("## Plan <now>") == "<b>Plan &lt;now&gt;</b>"
    assert to_html("```\n<b>\n```") == "<pre>&lt;b&gt;</pre>"
    assert to_html("snake_case and *stars*") == "snake_case and *stars*"


MARKDOWN = [*"ab<>&*`#[]()\n ", "**", "```", "https://q", "&amp;"]


@given(st.lists(st.sampled_from(MARKDOWN), max_size=80).map("".join))
@settings(max_examples=300, deadline=None)
def test_t28_html_always_parses_and_never_lengthens_the_visible_text(text: str) -> None:
    try:
        shown = visible_html(to_html(text))
    except ApiError as exc:  # pragma: no cover - the property is that this never happens
        pytest.fail(f"{text!r}: {exc.description}")
    assert utf16_units(shown) <= utf16_units(text)


# -- parsing and access ----------------------------------------------------------------


def message(fake: FakeTelegram, chat: int, text: str, **kw: Any) -> dict[str, Any]:
    return {"update_id": 5, "message": fake.message(chat, text, **kw)}


def parsed(element: dict[str, Any]) -> access.TgMessage:
    result = access.parse(element)
    assert isinstance(result, access.TgMessage)
    return result


Links = dict[tuple[int, int | None], access.LinkView]


def link(
    lid: str, channel: str = "c", trigger: str = "mention", allow: Any = None
) -> access.LinkView:
    return access.LinkView(lid, channel, trigger, allow)  # type: ignore[arg-type]


def test_t4_topic_link_else_chat_link() -> None:
    links: Links = {(-100, None): link("-100", "a"), (-100, 7): link("-100:7", "b")}
    assert access.link_for(links, -100, 7) is links[(-100, 7)]
    assert access.link_for(links, -100, 9) is links[(-100, None)]
    assert access.link_for(links, -100, None) is links[(-100, None)]
    assert access.link_for(links, -200, None) is None


def test_t6_t7_who_and_what_a_group_link_admits() -> None:
    fake = FakeTelegram()
    fake.chat(-100, "supergroup")
    links: Links = {(-100, None): link("-100", allow=("42",))}

    def decide(text: str, **kw: Any) -> access.Decision:
        kw.setdefault("from_id", 42)
        return access.decide(parsed(message(fake, -100, text, **kw)), links, BOT, pairing=False)

    assert decide("hi") == access.Ignore()
    assert decide(f"@{BOT_USERNAME}  what's up", mention=False) == access.Accept(
        links[(-100, None)], "what's up"
    )
    assert decide(f"@{BOT_USERNAME.upper()} hey") == access.Accept(links[(-100, None)], "hey")
    assert decide(f"@{BOT_USERNAME}") == access.Ignore()  # nothing left
    fake.chats[-100].last_bot_message = None
    assert decide("thanks!", reply_to_bot=True) == access.Accept(links[(-100, None)], "thanks!")
    assert decide(f"@{BOT_USERNAME} hi", from_id=43) == access.Ignore()
    assert decide(f"@{BOT_USERNAME} hi", is_bot=True) == access.Ignore()
    no_from = message(fake, -100, f"@{BOT_USERNAME} hi", from_id=42)
    del no_from["message"]["from"]
    assert access.decide(parsed(no_from), links, BOT, pairing=False) == access.Ignore()
    anon = message(fake, -100, f"@{BOT_USERNAME} hi", from_id=42, sender_chat={"id": -100})
    assert access.decide(parsed(anon), links, BOT, pairing=False) == access.Ignore()


def test_t7_private_and_all_take_text_verbatim() -> None:
    fake = FakeTelegram()
    links: Links = {(5, None): link("5", trigger="all")}
    text = f"@{BOT_USERNAME} keep me"
    decision = access.decide(parsed(message(fake, 5, text, from_id=5)), links, BOT, pairing=False)
    assert decision == access.Accept(links[(5, None)], text)


def test_t8_t21_commands_and_pairing() -> None:
    fake = FakeTelegram()
    fake.chat(-100, "group")
    links: Links = {(5, None): link("5", trigger="all")}

    def decide(chat: int, text: str, pairing: bool = True) -> access.Decision:
        return access.decide(
            parsed(message(fake, chat, text, from_id=5)), links, BOT, pairing=pairing
        )

    assert decide(5, "/status@other_bot") == access.Ignore()
    assert decide(5, f"/status@{BOT_USERNAME}") == access.Command(links[(5, None)], "status")
    assert decide(5, "/reset") == access.Command(links[(5, None)], "reset")
    assert decide(5, "/summarize this") == access.Accept(links[(5, None)], "/summarize this")
    assert decide(6, "hello") == access.Unlinked(pairing=True)
    assert decide(6, "hello", pairing=False) == access.Unlinked(pairing=False)
    assert decide(-100, "hello") == access.Unlinked(pairing=False)
    assert decide(-100, "/pair") == access.Unlinked(pairing=True)
    assert decide(-100, f"/start@{BOT_USERNAME}") == access.Unlinked(pairing=True)


def test_t16_t17_service_media_and_other_kinds() -> None:
    fake = FakeTelegram()
    links: Links = {(5, None): link("5", trigger="all")}

    def decide(**fields: Any) -> Any:
        raw = {"update_id": 9, "message": fake.message(5, None, from_id=5, **fields)}
        result = access.parse(raw)
        return (
            result
            if isinstance(result, access.Skipped)
            else access.decide(result, links, BOT, pairing=False)
        )

    assert decide(new_chat_members=[{"id": 1}]) == access.Ignore()
    assert decide(pinned_message={}) == access.Ignore()
    assert decide(photo=[{}], caption="look") == access.Unsupported(links[(5, None)], "photo")
    assert decide(animation={}, document={}) == access.Unsupported(links[(5, None)], "GIF")
    assert decide(voice={}) == access.Unsupported(links[(5, None)], "voice message")
    assert decide(venue={}) == access.Unsupported(links[(5, None)], "location")
    assert decide(brand_new_media={}) == access.Unsupported(links[(5, None)], "message")
    for kind in ("edited_message", "channel_post", "callback_query", "message_reaction"):
        assert access.parse({"update_id": 1, kind: {}}) == access.Skipped("ignored")
    assert decide(migrate_to_chat_id=-1009) == access.Migrate(-1009)


def test_t18_unusable_bodies_are_malformed() -> None:
    fake = FakeTelegram()
    good = message(fake, 5, "ok", from_id=5)
    for broken in (
        {"update_id": 1, "message": "x"},
        {"update_id": 1, "message": {**good["message"], "chat": "x"}},
        {"update_id": 1, "message": {**good["message"], "message_id": "7"}},
        {"update_id": 1, "message": {**good["message"], "text": 5}},
        {"update_id": 1, "message": {**good["message"], "text": "a" * 16_385}},
    ):
        assert access.parse(broken) == access.Skipped("malformed"), broken
    extra = {**good, **{f"future_{i}": i for i in range(30)}}
    assert isinstance(access.parse(extra), access.TgMessage)
    assert access.update_id({"update_id": "1"}) is None and access.update_id([1]) is None


def test_t15_metadata_strings() -> None:
    fake = FakeTelegram()
    fake.chat(-100, "supergroup", is_forum=True)
    fake.user(42, username="alice")
    tg = parsed({"update_id": 77, "message": fake.message(-100, "hi", from_id=42, thread_id=7)})
    assert access.metadata(tg) == {
        "source": "telegram",
        "telegram_chat_id": "-100",
        "telegram_message_id": "1",
        "telegram_update_id": "77",
        "telegram_chat_type": "supergroup",
        "telegram_user_id": "42",
        "telegram_user": "@alice",
        "telegram_topic_id": "7",
    }
    fake.user(43, first_name="Ada")
    fake.users[43]["last_name"] = "Lovelace"
    assert parsed(message(fake, 5, "x", from_id=43)).user == "Ada Lovelace"


# -- configuration (T1, T3) ---------------------------------------------------------------

GOOD = "123456:TEST-token-0123456789abcdefghijklmnopqr"


def config(**changes: Any) -> Any:
    values: dict[str, Any] = {
        "token": GOOD,
        "token_file": None,
        "api_url": None,
        "mode": None,
        "webhook_url": None,
        "webhook_secret": None,
        "poll_timeout_s": 30.0,
        "format": None,
        "pairing": None,
        "wait_s": 10.0,
        "misconfig_retry_s": 60.0,
        **changes,
    }
    return load_config(**values)


def test_t1_token_checks_and_file(tmp_path: Any) -> None:
    assert config(token=None) is None
    with pytest.raises(ValueError, match=r"^SKYDECK_TELEGRAM_TOKEN is not a bot token"):
        config(token="123:short")
    token_file = tmp_path / "token"
    token_file.write_text("999:" + "x" * 35 + "\nsecond line\n")
    loaded = config(token=GOOD, token_file=str(token_file))  # the file wins
    assert loaded.token == "999:" + "x" * 35
    assert GOOD.split(":")[1] not in repr(loaded) and "x" * 35 not in repr(loaded)
    assert config(api_url="http://h:1/").api_url == "http://h:1"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mode": "webhook"}, "SKYDECK_TELEGRAM_WEBHOOK_URL"),
        ({"mode": "push"}, "SKYDECK_TELEGRAM_MODE"),
        ({"format": "markdown"}, "SKYDECK_TELEGRAM_FORMAT"),
        ({"pairing": "yes"}, "SKYDECK_TELEGRAM_PAIRING"),
        ({"webhook_secret": "bad secret!"}, "SKYDECK_TELEGRAM_WEBHOOK_SECRET"),
    ],
)
def test_t3_bad_settings_name_the_setting(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        config(**changes)


# -- the store's Telegram rows: pairing limits (T8) and the janitor (§11) ----------------


def telegram_rows() -> Any:
    from skydeck.store.sqlite import SQLiteStore
    from skydeck.transports.telegram_store import TelegramStore

    return TelegramStore(SQLiteStore(":memory:"))


def test_t8_pairing_codes_expire_and_at_most_fifty_wait() -> None:
    rows = telegram_rows()
    for i in range(51):
        rows.add_pairing(
            {
                "code": f"C{i:05d}",
                "chat_id": 100 + i,
                "topic_id": None,
                "chat_type": "private",
                "title": None,
                "user": "@u",
                "created_at": 1000.0 + i,
                "expires_at": 1600.0 + i,
            }
        )
    waiting = rows.pairings(1000.0)
    assert len(waiting) == 50 and waiting[0]["code"] == "C00001"  # the oldest dropped
    assert rows.pairing("C00050", 1649.0) is not None
    assert rows.pairing("C00050", 1650.0) is None  # 10 minutes, then gone
    assert rows.pending_pairing_for(150, 1000.0) and not rows.pending_pairing_for(100, 1000.0)


def test_janitor_prunes_old_update_ids_pairings_and_done_rows() -> None:
    from skydeck.transports.telegram_store import NewRow

    rows = telegram_rows()
    rows.record_updates([(5, "accepted"), (6, "ignored")])
    assert rows.handled([5, 6, 7]) == {5, 6} and rows.offset() == 7
    rows.queue([NewRow(chat_id=1, topic_id=None, kind="notice", text="a") for _ in range(2)])
    first = rows.head(1)
    assert first is not None
    rows.sent(first, 77)
    now = first.created
    rows.prune(now + 47 * 3600)
    assert rows.depth()[0] == 1  # the sent row is kept for 24 h, the pending one always
    rows.prune(now + 49 * 3600)
    assert rows.depth()[0] == 1 and rows.head(1) is not None  # pending rows never expire
    assert rows.outbox(now + 49 * 3600)[0].state.value == "pending"
    assert rows.handled([5, 6]) == {5, 6}  # below the offset: still duplicates, though pruned
    assert not rows._read("SELECT 1 FROM telegram_updates")
