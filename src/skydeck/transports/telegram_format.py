"""What a reply looks like in Telegram, decided in pure code (telegram.md T27, T28).

`chunk` cuts an agent's text into messages of at most 4096 UTF-16 code units
(Telegram's limit is counted in UTF-16, so an emoji costs two), at the best
boundary it can find and with code fences kept balanced in every part; `to_html`
turns the Markdown agents write into the small HTML subset Telegram renders.
Chunking runs on the agent's text first and conversion never lengthens the
visible text, so a part within the limit stays within it after Telegram parses
its entities.
"""

from __future__ import annotations

import html
import re

TEXT_LIMIT = 4096
MAX_PARTS = 20
_FENCE = re.compile(r"^ {0,3}```")
_CLOSE = "\n```"
_INLINE = re.compile(
    r"`(?P<code>[^`\n]+)`"
    r"|\*\*(?P<bold>[^*\n](?:.*?[^*\n])?)\*\*"
    r"|\[(?P<label>[^\]\n]+)\]\((?P<url>(?:https?|tg)://[^\s)]+)\)"
)
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")


def utf16_units(text: str) -> int:
    """Telegram's length of ``text``: UTF-16 code units."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _within(text: str, limit: int) -> int:
    """How many characters of ``text`` fit in ``limit`` UTF-16 units (a code
    point is never split, so no surrogate pair is either)."""
    if utf16_units(text[:limit]) <= limit:
        return min(len(text), limit)
    used = 0
    for index, ch in enumerate(text):
        used += 2 if ord(ch) > 0xFFFF else 1
        if used > limit:
            return index
    return len(text)


def _open_fence(text: str) -> tuple[str | None, int]:
    """The info string of a fence still open at the end of ``text`` ("" when it has
    none; None when every fence is closed) and where its opening line starts."""
    info: str | None = None
    start = -1
    position = 0
    for line in text.split("\n"):
        if _FENCE.match(line):
            if info is None:
                info, start = line.strip()[3:].strip(), position
            else:
                info, start = None, -1
        position += len(line) + 1
    return info, start


def _boundary(body: str, n: int) -> tuple[int, int]:
    """Where to cut ``body`` at or before character ``n``: the last blank line,
    else line break, else space in the second half of the window, else a hard
    cut at ``n``. Returns (cut, length of the separator dropped there)."""
    half = n // 2
    for separator in ("\n\n", "\n", " "):
        found = body.rfind(separator, half, n + len(separator))
        if found >= half and found > 0:
            return found, len(separator)
    return n, 0


def _cut(body: str, limit: int, reopened: int) -> tuple[str, str, str]:
    """One part of ``body``: (the part, what is left, the fence line reopening
    the block cut in the middle, or ""). ``reopened``: characters at the start of
    ``body`` that are a reopened fence (never a place to cut before)."""
    budget = limit
    while True:
        n = _within(body, budget)
        cut, separator = _boundary(body, n)
        if cut <= reopened:
            cut, separator = n, 0  # no boundary after the reopened fence: hard cut
        part = body[:cut]
        info, start = _open_fence(part)
        if info is None:
            return part, body[cut + separator :], ""
        if start >= n // 2 and start > reopened:
            # The block opens in the second half: cut before its opening fence.
            return body[:start].rstrip("\n"), body[start:], ""
        if budget == limit:
            budget = limit - len(_CLOSE)  # room for the closing fence, then again
            continue
        reopen = f"```{info}\n"
        return part + _CLOSE, body[cut + separator :], reopen


def chunk(text: str, *, reply_id: str = "", limit: int = TEXT_LIMIT) -> list[str]:
    """T27: ``text`` as Telegram messages of at most ``limit`` UTF-16 units each.

    Nothing but the separator at a cut (a blank line, a line break, a space)
    is dropped; a cut inside a fenced block closes it and reopens it (same info
    string) in the next part. At most `MAX_PARTS` parts: the last one then says
    how much was left out and where the whole reply is.
    """
    if utf16_units(text) <= limit:
        return [text]
    parts: list[str] = []
    rest, reopen = text, ""
    while rest:
        body = reopen + rest
        if utf16_units(body) <= limit:
            parts.append(body)
            break
        if len(parts) == MAX_PARTS - 1:
            parts.append(
                f"[reply truncated: {len(rest)} more characters; the full text is "
                f"message {reply_id} in skydeck]"
            )
            break
        part, rest, reopen = _cut(body, limit, len(reopen))
        if part.strip():
            parts.append(part)
    return parts


# -- Markdown -> Telegram HTML ------------------------------------------------------


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def _inline(text: str) -> str:
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(_escape(text[position : match.start()]))
        position = match.end()
        if match.group("code") is not None:
            out.append(f"<code>{_escape(match.group('code'))}</code>")
        elif match.group("bold") is not None:
            out.append(f"<b>{_escape(match.group('bold'))}</b>")
        else:
            href = html.escape(match.group("url"), quote=True)
            out.append(f'<a href="{href}">{_escape(match.group("label"))}</a>')
    out.append(_escape(text[position:]))
    return "".join(out)


def _block(info: str, lines: list[str]) -> str:
    code = _escape("\n".join(lines))
    if info:
        language = html.escape(info.split()[0], quote=True)
        return f'<pre><code class="language-{language}">{code}</code></pre>'
    return f"<pre>{code}</pre>"


def to_html(markdown: str) -> str:
    """T28: fenced blocks, `code`, **bold**, [links](https://…) and #-headings
    as Telegram HTML; everything else literal, escaped. No italics: `_` and `*`
    fill code and paths, and a stray one must not turn a reply into a parse error."""
    out: list[str] = []
    fence: list[str] | None = None
    info = ""
    for line in markdown.split("\n"):
        if fence is not None:
            if _FENCE.match(line):
                out.append(_block(info, fence))
                fence = None
            else:
                fence.append(line)
            continue
        if _FENCE.match(line):
            fence, info = [], line.strip()[3:].strip()
            continue
        heading = _HEADING.match(line)
        out.append(f"<b>{_inline(heading.group(1))}</b>" if heading else _inline(line))
    if fence is not None:
        out.append(_block(info, fence))
    # A block's own line break is the tag's: the newline after it would show twice.
    return "\n".join(out)
