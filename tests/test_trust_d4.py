"""Issue 11, D4: backend output is held in bounded memory, with a real daemon.

A program may print without end. The daemon keeps the head of stdout up to the
agent's ``max_reply_bytes`` (default 1 MiB) and reads the rest away, keeps only
the tail of stderr, and drops a claude stream line longer than 16 MiB; while it
does, its RSS stays flat and ``/health`` keeps answering.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from daemon_process import DaemonProcess, cli
from skydeck.backends.output import LineSplitter, Overlong, cut_reply, human_size

MB = 1_000_000
MIB = 1024 * 1024
TERMINAL = ("done", "failed", "cancelled", "dropped")
#: The issue's bar: 300 MB of output may not grow the daemon by 100 MB.
RSS_BUDGET = 100 * MB


@dataclass
class Watched:
    message: dict[str, object]
    reply: str
    peak_growth: int
    worst_health_s: float


def hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), in bytes: a spike between polls counts."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class Rig:
    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.client = httpx.Client(base_url=daemon.url, timeout=30)
        self.proc = psutil.Process(daemon.proc.pid)

    def agent(self, name: str, **fields: object) -> None:
        body = {"name": name, "channel": name, **fields}
        created = self.client.post("/api/agents", json=body)
        assert created.status_code == 201, created.text

    def watch(self, channel: str, content: str, timeout: float = 60) -> Watched:
        """Post, then poll /health and the daemon's RSS until the turn ends."""
        before = self.proc.memory_info().rss
        ack = self.client.post(f"/api/channels/{channel}/messages", json={"content": content})
        assert ack.status_code == 200, ack.text
        peak, worst = before, 0.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            start = time.perf_counter()
            health = self.client.get("/health", timeout=5)
            worst = max(worst, time.perf_counter() - start)
            assert health.status_code == 200
            peak = max(peak, self.proc.memory_info().rss)
            message = self.client.get(f"/api/messages/{ack.json()['id']}").json()
            if message["state"] in TERMINAL:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"turn did not end in {timeout} s")
        reply = self.client.get(f"/api/messages/{message['reply_id']}").json()["content"]
        growth = max(peak, hwm(self.proc.pid)) - before
        return Watched(message, reply, growth, worst)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    fake_claude = tmp_path / "fake-claude"
    # The real interpreter, not the venv's link to it: a sandbox sees /usr, not the venv.
    fake_claude.write_text(f"#!{os.path.realpath(sys.executable)}\n{FAKE_CLAUDE}")
    fake_claude.chmod(0o755)
    daemon = DaemonProcess(
        tmp_path / "data", "--no-demo", env={"SKYDECK_CLAUDE_BIN": str(fake_claude)}
    )
    rig = Rig(daemon)
    try:
        yield rig
    finally:
        rig.client.close()
        daemon.kill()


def sh(script: str) -> list[str]:
    return ["sh", "-c", f"cat >/dev/null; {script}"]


def test_trust_d4_300_mb_of_stdout_is_cut_at_1_mib_in_bounded_memory(rig: Rig) -> None:
    rig.agent(
        "flood",
        backend="command",
        command=sh("yes 0123456789abcdef | head -c 300000000; echo ran-to-the-end > finished"),
    )
    rig.agent("warm", backend="command", command=["cat"])
    rig.watch("warm", "warm-up")  # first-turn allocations are not the flood's

    seen = rig.watch("flood", "go")

    assert seen.message["state"] == "done"
    assert seen.reply.startswith("0123456789abcdef\n0123456789abcdef\n")
    assert seen.reply.endswith("\n\n[reply cut at 1 MiB]")
    assert len(seen.reply.encode()) <= MIB, "the reply, marker included, fits the cap"
    assert (rig.daemon.data_dir / "workspaces" / "flood" / "finished").exists(), (
        "the rest was read and dropped: the program ran to its end"
    )
    assert seen.peak_growth < RSS_BUDGET, f"daemon grew by {seen.peak_growth / MB:.0f} MB"
    assert seen.worst_health_s < 1.0, f"/health took {seen.worst_health_s:.2f} s"
    print(
        f"\nD4 300 MB stdout: peak RSS growth {seen.peak_growth / MB:.1f} MB, "
        f"worst /health {seen.worst_health_s * 1000:.0f} ms"
    )


def test_trust_d4_stderr_keeps_only_its_tail(rig: Rig) -> None:
    rig.agent(
        "noisy",
        backend="command",
        command=sh("yes chatter | head -c 200000000 >&2; echo 'the real error' >&2; exit 3"),
    )
    rig.agent("warm", backend="command", command=["cat"])
    rig.watch("warm", "warm-up")

    seen = rig.watch("noisy", "go")

    assert seen.message["state"] == "failed"
    assert seen.message["error"] == ("chatter\n" * 300 + "the real error\n")[-2000:].strip()
    assert seen.peak_growth < RSS_BUDGET, f"daemon grew by {seen.peak_growth / MB:.0f} MB"


def test_trust_d4_cap_is_per_agent_and_said_human_readably(rig: Rig) -> None:
    added = cli(
        rig.daemon.url,
        "agent",
        "add",
        "kib",
        "--channel",
        "kib",
        "--backend",
        "command",
        "--command",
        "sh -c 'cat >/dev/null; yes k | head -c 100000'",
        "--max-reply-bytes",
        "65536",
    )
    assert added.returncode == 0, added.stderr
    assert rig.client.get("/api/agents/kib").json()["max_reply_bytes"] == 65536
    rig.agent("bytes", backend="command", command=["cat"], max_reply_bytes=1000)
    rig.agent("default", backend="echo")
    assert rig.client.get("/api/agents/default").json()["max_reply_bytes"] == MIB

    kib = rig.watch("kib", "go").reply
    assert kib.startswith("k\nk\nk\n") and kib.endswith("k\n\n[reply cut at 64 KiB]")
    assert 65536 - 2 <= len(kib.encode()) <= 65536, "as much as fits, marker included"
    exact = rig.watch("bytes", "x" * 1000).reply
    assert exact == "x" * 1000, "exactly at the cap: nothing is cut"
    over = rig.watch("bytes", "é" * 600).reply  # 1200 bytes of UTF-8
    marker = "\n\n[reply cut at 1000 bytes]"
    assert over.endswith(marker) and len(over.encode()) <= 1000
    assert over.removesuffix(marker) == "é" * ((1000 - len(marker)) // 2), (
        "cut on a character boundary"
    )
    threads = rig.client.get("/api/threads", params={"channel": "bytes"}).json()["threads"]
    assert threads[-1]["output"] == over, "the thread record holds the cut reply too"


def test_trust_d4_max_reply_bytes_is_validated(rig: Rig) -> None:
    rig.agent("good", backend="echo", max_reply_bytes=64 * MIB)
    for value in (999, 64 * MIB + 1, "65536", True, 1.5, None, -1):
        body = {"name": "bad", "channel": "bad", "backend": "echo", "max_reply_bytes": value}
        created = rig.client.post("/api/agents", json=body)
        assert (created.status_code, created.json()["field"]) == (400, "max_reply_bytes"), value
        assert "from 1000 to 67108864" in created.json()["error"]
        patched = rig.client.patch("/api/agents/good", json={"max_reply_bytes": value})
        assert (patched.status_code, patched.json()["field"]) == (400, "max_reply_bytes"), value
    assert rig.client.get("/api/agents/good").json()["max_reply_bytes"] == 64 * MIB


# A stand-in for `claude -p --output-format stream-json`: a 200 MB line that is not
# JSON, then an answer of 3 MiB, then a successful result.
FAKE_CLAUDE = """
import json, sys
session = sys.argv[sys.argv.index("--session-id") + 1]
out = sys.stdout.buffer
def line(obj):
    out.write(json.dumps(obj).encode() + b"\\n")
line({"type": "system", "subtype": "init", "session_id": session})
for _ in range(200):
    out.write(b"x" * 1_000_000)
out.write(b"\\n")
text = {"type": "text", "text": "A" * (3 * 1024 * 1024)}
line({"type": "assistant", "message": {"content": [text]}, "session_id": session})
line({"type": "result", "subtype": "success", "is_error": False, "result": "A",
      "session_id": session, "usage": {"output_tokens": 1}})
"""


def test_trust_d4_claude_stream_overlong_line_and_long_answer(rig: Rig) -> None:
    rig.agent("claude", backend="claude")
    rig.agent("warm", backend="command", command=["cat"])
    rig.watch("warm", "warm-up")

    seen = rig.watch("claude", "write a lot")

    assert seen.message["state"] == "done", seen.message
    assert seen.reply.startswith("AAAA")
    assert seen.reply.endswith("\n\n[reply cut at 1 MiB]")
    assert len(seen.reply.encode()) <= MIB
    assert seen.peak_growth < RSS_BUDGET, f"daemon grew by {seen.peak_growth / MB:.0f} MB"
    assert seen.worst_health_s < 1.0, f"/health took {seen.worst_health_s:.2f} s"


def test_trust_d4_line_splitter_and_cut_rules() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed(b"ab") == []
    assert splitter.feed(b"cd\nabcde") == [b"abcd"], "exactly at the limit is a line"
    assert splitter.feed(b"fgh\n\nx") == [Overlong(8), b""], "dropped as it came in"
    assert splitter.feed(b"yz") == [] and splitter.end() == [b"xyz"]
    assert splitter.feed(b"toolong") == [] and splitter.end() == [Overlong(7)]

    assert [human_size(n) for n in (MIB, 3 * MIB, 65536, 1536, 1000)] == [
        "1 MiB",
        "3 MiB",
        "64 KiB",
        "1536 bytes",
        "1000 bytes",
    ]
    assert cut_reply("short", 1000) == "short"
    assert cut_reply("short", 1000, cut=True) == "short\n\n[reply cut at 1000 bytes]"
