"""What skydeck keeps of a backend's output, in bounded memory, without any I/O.

A program may print without end. The daemon keeps the *head* of stdout up to
the agent's ``max_reply_bytes`` (the rest is read and thrown away, so the
program still runs to its end), the *tail* of stderr (the error is at the
end), and splits a line stream without ever holding a line longer than
`MAX_LINE_BYTES`. The reply itself, marker included, is never longer than
the cap in UTF-8 bytes: `cut_reply` is the one rule for that.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
#: A stream-json line longer than this is a parse error, never a buffer that grows.
MAX_LINE_BYTES = 16 * MIB


def human_size(size: int) -> str:
    """A byte count said exactly: whole MiB, else whole KiB, else bytes.

    1048576 -> ``1 MiB``, 65536 -> ``64 KiB``, 1000 -> ``1000 bytes`` (never rounded).
    """
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} bytes"


def cut_marker(limit: int) -> str:
    return f"\n\n[reply cut at {human_size(limit)}]"


def cut_reply(text: str, limit: int, *, cut: bool = False) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes and nothing was cut before;
    else its head followed by the cut marker, the whole at most ``limit`` bytes."""
    encoded = text.encode()
    if not cut and len(encoded) <= limit:
        return text
    marker = cut_marker(limit)
    head = encoded[: max(limit - len(marker.encode()), 0)]
    return head.decode(errors="ignore").rstrip() + marker


class HeadBuffer:
    """The first ``limit`` bytes of a stream; of the rest only whether there was any."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflowed = False
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self._data)
        if len(chunk) > room:
            self.overflowed = True
            chunk = chunk[: max(room, 0)]
        self._data += chunk

    def text(self) -> str:
        return self._data.decode(errors="replace")


class TailBuffer:
    """The last ``limit`` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()

    @classmethod
    def for_chars(cls, chars: int) -> TailBuffer:
        """Enough bytes for the last ``chars`` characters of any UTF-8 text."""
        return cls(4 * chars + 4)

    def add(self, chunk: bytes) -> None:
        self._data += chunk[-self.limit :]
        if len(self._data) > self.limit:
            del self._data[: len(self._data) - self.limit]

    def tail(self, chars: int) -> str:
        """The last ``chars`` characters."""
        return self._data.decode(errors="replace")[-chars:]


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line longer than the splitter's limit, dropped; ``size`` bytes were thrown away."""

    size: int


class LineSplitter:
    """Bytes in, lines out (without the newline). A line over ``max_line`` bytes comes
    out as `Overlong`: it is dropped as it streams in, so memory stays at ``max_line``."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._dropped = 0  # > 0 while inside an overlong line

    def feed(self, chunk: bytes) -> list[bytes | Overlong]:
        lines: list[bytes | Overlong] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._take(chunk[start:end])
            lines.append(self._line())
            start = end + 1
        self._take(chunk[start:])
        return lines

    def end(self) -> list[bytes | Overlong]:
        """The last line, when the stream ended without a newline."""
        return [self._line()] if self._buffer or self._dropped else []

    def _take(self, piece: bytes) -> None:
        if self._dropped:
            self._dropped += len(piece)
        elif len(self._buffer) + len(piece) > self.max_line:
            self._dropped = len(self._buffer) + len(piece)
            self._buffer.clear()
        else:
            self._buffer += piece

    def _line(self) -> bytes | Overlong:
        if self._dropped:
            line: bytes | Overlong = Overlong(self._dropped)
            self._dropped = 0
        else:
            line = bytes(self._buffer)
            self._buffer.clear()
        return line
