"""Issue 11, D7: connections close — `Connection: close`, idle keep-alive, stalled
bodies — against a real `skydeck serve` process, over raw sockets.

The daemon runs with a 1 s keep-alive and a 2 s body timeout so the real waits
stay short; the defaults (5 s, 30 s) are the same code with other numbers.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from daemon_process import DaemonProcess

KEEPALIVE_S = 1.0
BODY_TIMEOUT_S = 2.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "data",
        env={
            "SKYDECK_KEEPALIVE_S": str(KEEPALIVE_S),
            "SKYDECK_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        },
    )
    yield process
    assert process.stop() == 0


def connect(daemon: DaemonProcess) -> socket.socket:
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def read_to_eof(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; how long that took."""
    sock.settimeout(within)
    started, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"no EOF within {within} s; got {data[:200]!r}") from None
    return data, time.monotonic() - started


def open_fds(daemon: DaemonProcess) -> int:
    return int(psutil.Process(daemon.proc.pid).num_fds())


def test_trust_d7_connection_close_is_honoured_and_fds_come_back(daemon: DaemonProcess) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    before = open_fds(daemon)
    sockets = []
    for _ in range(150):  # all open at once, as in the report
        sock = connect(daemon)
        sock.sendall(request)
        sockets.append(sock)
    for sock in sockets:
        data, took = read_to_eof(sock, within=5)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        assert took < KEEPALIVE_S, "closed right after the response, not by the idle timer"
        sock.close()
    deadline = time.monotonic() + 5
    while open_fds(daemon) > before + 2:
        assert time.monotonic() < deadline, (before, open_fds(daemon))
        time.sleep(0.05)


def test_trust_d7_idle_keep_alive_connections_time_out(daemon: DaemonProcess) -> None:
    started = time.monotonic()
    idle = connect(daemon)  # never sends a byte
    used = connect(daemon)  # one request, then idle
    used.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for sock in (idle, used):
        data, _ = read_to_eof(sock, within=KEEPALIVE_S + 4)
        assert KEEPALIVE_S - 0.2 <= time.monotonic() - started < KEEPALIVE_S + 4
        sock.close()
    assert data.startswith(b"HTTP/1.1 200"), "the used one got its answer, then was closed"


def test_trust_d7_a_stalled_body_is_cut_with_408(daemon: DaemonProcess) -> None:
    sock = connect(daemon)
    sock.sendall(
        b"POST /api/channels/demo/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    started = time.monotonic()
    for byte in b'"content": "slow':  # 1 byte every 0.25 s: never finishes in time
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break  # the server has cut the connection: what this test waits for
        time.sleep(0.25)
        # Stop writing just before the cut: a byte sent into a closed socket draws a
        # reset, which can discard the 408 before it is read.
        if time.monotonic() - started > BODY_TIMEOUT_S - 0.5:
            break
    data, _ = read_to_eof(sock, within=5)
    took = time.monotonic() - started
    sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"error":"the request body did not arrive within 2 s"' in data
    assert BODY_TIMEOUT_S - 0.2 <= took < BODY_TIMEOUT_S + 3
    assert httpx.get(f"{daemon.url}/api/channels/demo/messages").json()["messages"] == []
