"""T1, T2, T8: escape probes against a real ``skydeck serve`` with real /usr/bin/bwrap
(sandbox.md §5). Every check is also made from the host, not only read from the reply."""

from __future__ import annotations

import http.server
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon_process import SKYDECK, DaemonProcess, clean_env
from helpers import alive_in, namespace_of

TOKEN = "daemon-secret-" + os.urandom(8).hex()
VICTIM_SECRET = "victim-secret-" + os.urandom(8).hex()
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

#: Reads the prompt's lines, runs the probes, prints one line each. The secrets arrive
#: split in halves (so the stored prompt never holds them whole) and reach grep only
#: through a file (so no probe's own cmdline holds them either).
SCRIPT = r"""
read -r DPID; read -r PORT; read -r DATA; read -r VICTIM; read -r CLIDIR; read -r ME
read -r A1; read -r A2; read -r B1; read -r B2; read -r EGRESS
printf '%s%s\n%s%s\n' "$A1" "$A2" "$B1" "$B2" > /tmp/patterns
probe() {
  n=$1; shift
  if out=$("$@" 2>&1); then echo "ESCAPED $n"; else echo "denied $n (${out//$'\n'/ })"; fi
}
p1() { head -c 16 "$DATA/skydeck.db" >/dev/null; }
p2() { names=$(ls "$DATA/workspaces") || return 1; [ "$names" != "$ME" ]; }
p3() { cat "$VICTIM/secret.txt"; }
p4() {
  cat /proc/1/environ /proc/$DPID/environ 2>/dev/null | grep -qaFf /tmp/patterns && return 0
  cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | grep -qaFf /tmp/patterns && return 0
  ! ls /proc/$DPID >/dev/null 2>&1 && echo "no /proc/$DPID" && return 1
}
p5() { echo x > /etc/skydeck-escape; }
p6() { echo x > "$DATA/escape"; }
p7() { echo x > "$CLIDIR/skydeck-escape"; }
p8() { kill -9 "$DPID"; }
p9() { exec 3<>/dev/tcp/127.0.0.1/$PORT; }
ask() {  # $1: a request head; prints the proxy's status line and whatever the body says
  exec 4<>/dev/tcp/127.0.0.1/3128 || return 1
  printf '%b' "$1" >&4
  timeout 5 head -c 400 <&4
}
END="Connection: close\r\n\r\n"
p10() {
  tunnel="CONNECT 127.0.0.1:$PORT HTTP/1.1\r\nHost: 127.0.0.1:$PORT\r\n\r\n"
  r=$(ask "${tunnel}GET /api/agents HTTP/1.1\r\nHost: x\r\n$END") || return 1
  case "$r" in *'"agents"'*) return 0;; esac
  r2=$(ask "GET http://127.0.0.1:$PORT/api/agents HTTP/1.1\r\nHost: 127.0.0.1:$PORT\r\n$END")
  case "$r2" in *'"agents"'*) return 0;; esac
  echo "${r%%$'\r'*}"; return 1
}
p11() {
  r=$(ask "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n") || return 1
  case "$r" in 'HTTP/1.1 200'*) return 0;; esac
  echo "${r%%$'\r'*}"; return 1
}
p12() { unshare -U true; }
for n in 1 2 3 4 5 6 7 8 9 10 11 12; do probe $n p$n; done
echo ws-ok > own.txt && [ "$(cat own.txt)" = ws-ok ] && echo "control workspace ok"
r=$(ask "GET http://$EGRESS/ping HTTP/1.1\r\nHost: $EGRESS\r\n$END")
case "$r" in *pong*) echo "control egress ok";; *) echo "control egress failed: ${r%%$'\r'*}";; esac
/usr/bin/python3 - <<'PY'
import json, os, urllib.request
url, token = os.environ["SKYDECK_MCP_URL"], os.environ["SKYDECK_MCP_TOKEN"]
def post(body, session=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    if session:
        headers["Mcp-Session-Id"] = session
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.headers.get("Mcp-Session-Id"), answer.read().decode()
params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t1"}}
session, _ = post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
_, listed = post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
print("control mcp ok" if '"send_message"' in listed else f"control mcp failed: {listed[:300]}")
print("mcp url " + url)
PY
"""


class Pong(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"pong"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def pong_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pong)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_turn(
    client: httpx.Client, channel: str, content: str, timeout: float = 60
) -> dict[str, Any]:
    """Post and wait for the message to end; the message, with ``reply`` when there is one."""
    ack = client.post(f"/api/channels/{channel}/messages", json={"content": content})
    assert ack.status_code in (200, 201, 202), ack.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message: dict[str, Any] = client.get(f"/api/messages/{ack.json()['id']}").json()
        if message["state"] in ("done", "failed", "cancelled"):
            if message.get("reply_id"):
                message["reply"] = client.get(f"/api/messages/{message['reply_id']}").json()[
                    "content"
                ]
            return message
        time.sleep(0.05)
    raise AssertionError(f"turn on {channel} did not end")


def claude_dir() -> str:
    from skydeck.backends.claude import find_claude

    found = find_claude()
    assert found is not None
    return str(Path(os.path.realpath(found)).parent)


@pytest.fixture
def escape_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, httpx.Client]]:
    data = tmp_path / "data"
    victim = data / "workspaces" / "victim"
    victim.mkdir(parents=True)
    (victim / "secret.txt").write_text(VICTIM_SECRET)
    daemon = DaemonProcess(
        data, "--no-demo", env={"SKYDECK_TOKEN": TOKEN, "SKYDECK_JWT_SECRET": TOKEN}
    )
    try:
        with httpx.Client(base_url=daemon.url, headers=HEADERS, timeout=30) as client:
            yield daemon, client
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()


def escape_prompt(
    daemon: DaemonProcess, name: str, egress: str, pid: int | None = None, cli: str | None = None
) -> str:
    """The probes' input; ``pid`` and ``cli`` stand in for the daemon's pid (probe 8) and
    the CLI's install dir (probe 7) when the probes are expected to escape."""
    data = daemon.data_dir
    half_a, half_b = len(TOKEN) // 2, len(VICTIM_SECRET) // 2
    return "\n".join(
        [
            str(pid or daemon.proc.pid),
            daemon.url.rsplit(":", 1)[1],
            str(data),
            str(data / "workspaces" / "victim"),
            cli or claude_dir(),
            name,
            TOKEN[:half_a],
            TOKEN[half_a:],
            VICTIM_SECRET[:half_b],
            VICTIM_SECRET[half_b:],
            egress,
            "",
        ]
    )


def probe_lines(reply: str) -> dict[str, str]:
    """``{"1": "denied 1 (...)", ...}`` from the probe lines of a reply."""
    out = {}
    for line in reply.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("denied", "ESCAPED"):
            out[rest.split(" ", 1)[0]] = line
    return out


def test_t1_escape_probes_are_denied_and_controls_work(
    escape_daemon: tuple[DaemonProcess, httpx.Client],
) -> None:
    """S9, S11, S15, S17, S19: twelve escapes denied; the workspace and egress still work."""
    daemon, client = escape_daemon
    data = daemon.data_dir
    with pong_server() as pong:
        egress = f"127.0.0.1:{pong}"
        created = client.post(
            "/api/agents",
            json={
                "name": "prober",
                "channel": "prober",
                "backend": "command",
                "command": ["/bin/bash", "-c", SCRIPT],
                "egress": [egress],
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["sandbox_effective"] == "workspace"
        message = run_turn(client, "prober", escape_prompt(daemon, "prober", egress))
    assert message["state"] == "done", message
    reply = message["reply"]
    probes = probe_lines(reply)
    assert sorted(probes, key=int) == [str(n) for n in range(1, 13)], reply
    assert all(line.startswith("denied") for line in probes.values()), reply
    assert "control workspace ok" in reply and "control egress ok" in reply, reply
    # S11, S17 (a): its own /mcp/<channel>, through the relay, is the one way to the daemon.
    assert "control mcp ok" in reply and "mcp url http://127.0.0.1:3128/mcp/prober" in reply
    # From the host: nothing escaped, the daemon is whole.
    assert (data / "workspaces" / "prober" / "own.txt").read_text() == "ws-ok\n"
    assert not Path("/etc/skydeck-escape").exists()
    assert not (data / "escape").exists()
    assert not (Path(claude_dir()) / "skydeck-escape").exists()
    assert psutil.pid_exists(daemon.proc.pid) and daemon.proc.poll() is None
    assert client.get("/health").json()["status"] == "ok"
    with sqlite3.connect(data / "skydeck.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        dump = "\n".join(db.iterdump())
    for secret in (TOKEN, VICTIM_SECRET):
        assert secret not in reply and secret not in dump
    metrics = client.get("/metrics").text
    denied = [
        line
        for line in metrics.splitlines()
        if line.startswith('skydeck_sandbox_egress_denied_total{agent="prober"}')
    ]
    assert denied and float(denied[0].split()[-1]) >= 2, metrics


def test_t2_the_same_probes_escape_with_sandbox_off(
    escape_daemon: tuple[DaemonProcess, httpx.Client],
) -> None:
    """T2: proof the probes can see an escape (#140's lesson)."""
    daemon, client = escape_daemon
    created = client.post(
        "/api/agents",
        json={
            "name": "loose",
            "channel": "loose",
            "backend": "command",
            "command": ["/bin/bash", "-c", SCRIPT],
            "sandbox": "off",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["sandbox_effective"] == "off"
    # Unsandboxed, probe 8 really kills: it gets a stand-in for the daemon.
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        cli = daemon.data_dir.parent / "cli"
        cli.mkdir()
        prompt = escape_prompt(daemon, "loose", "127.0.0.1:9", pid=stand_in.pid, cli=str(cli))
        message = run_turn(client, "loose", prompt)
        assert stand_in.wait(5) == -9  # probe 8 escaped too
    finally:
        stand_in.kill()
        Path("/etc/skydeck-escape").unlink(missing_ok=True)  # what probe 5 wrote on the host
    probes = probe_lines(message["reply"])
    for n in ("1", "3", "5", "7", "8", "9"):
        assert probes[n].startswith("ESCAPED"), message["reply"]
    assert (daemon.data_dir / "escape").exists()  # probe 6 as seen from the host


# -- T8: unavailable and required (S3, S5, S6) ---------------------------------------


def serve_result(data: Path, *args: str, env: dict[str, str], wrap: list[str] = ()) -> str:  # type: ignore[assignment]
    """A `skydeck serve` expected to stop at start: its stderr."""
    done = subprocess.run(
        [*wrap, SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean_env(), **env},
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    return done.stderr


def test_t8_required_refuses_to_start_without_bwrap(tmp_path: Path) -> None:
    stderr = serve_result(
        tmp_path / "data",
        "--sandbox",
        "required",
        env={"SKYDECK_BWRAP": "/nonexistent/bwrap"},
    )
    assert (
        "refusing to start: --sandbox required, but bwrap not found at /nonexistent/bwrap "
        "(install the bubblewrap package)"
    ) in stderr


def test_t8_required_refuses_to_start_without_user_namespaces(tmp_path: Path) -> None:
    """A real user-namespace failure: the daemon itself inside a sandbox that forbids them."""
    stderr = serve_result(
        tmp_path / "data",
        env={"SKYDECK_SANDBOX": "required"},
        wrap=["/usr/bin/bwrap", "--dev-bind", "/", "/", "--unshare-user", "--disable-userns", "--"],
    )
    assert "refusing to start: --sandbox required, but bwrap cannot create a sandbox: " in stderr
    assert "ENOSPC" in stderr and "user.max_user_namespaces" in stderr


def test_t8_auto_without_user_namespaces_says_why_in_the_banner_and_health(
    tmp_path: Path,
) -> None:
    """The same real failure under auto: the daemon starts, unsandboxed, and says why."""
    # --die-with-parent: bwrap forwards no signal, so the daemon goes when bwrap does.
    wrap = [
        "/usr/bin/bwrap",
        "--dev-bind",
        "/",
        "/",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--",
    ]
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*wrap, SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        url = lines[2].split()[1].removesuffix("/api")
        banner = lines[3].strip()
        assert banner.startswith(
            "sandbox: OFF for agents without their own setting: bwrap cannot create a sandbox: "
        ), lines
        assert "ENOSPC" in banner
        health = httpx.get(f"{url}/health", timeout=10).json()["sandbox"]
        assert health["available"] is False and health["default"] == "off"
        assert "ENOSPC" in health["reason"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_s4_a_relative_bwrap_path_refuses_to_start(tmp_path: Path) -> None:
    stderr = serve_result(tmp_path / "data", env={"SKYDECK_BWRAP": "bin/bwrap"})
    assert "SKYDECK_BWRAP must be an absolute path, not 'bin/bwrap'" in stderr


def test_s3_a_bad_policy_refuses_to_start(tmp_path: Path) -> None:
    stderr = serve_result(tmp_path / "data", "--sandbox", "maybe", env={})
    assert "--sandbox must be one of: auto, off, workspace, strict, required" in stderr


def test_t8_auto_without_bwrap_runs_unsandboxed_as_the_banner_says(tmp_path: Path) -> None:
    """S5/S6 under auto with no bwrap: banner, /health, a null agent runs off, an agent
    that asked for a sandbox fails with the reason and leaves no marker."""
    data = tmp_path / "data"
    daemon = DaemonProcess(data, "--no-demo", env={"SKYDECK_BWRAP": "/nonexistent/bwrap"})
    try:
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            reason = "bwrap not found at /nonexistent/bwrap (install the bubblewrap package)"
            assert client.get("/health").json()["sandbox"] == {
                "available": False,
                "default": "off",
                "required": False,
                "reason": reason,
            }
            marker = tmp_path / "marker"
            for name, sandbox in (("plain", None), ("boxed", "workspace")):
                body: dict[str, Any] = {
                    "name": name,
                    "channel": name,
                    "backend": "command",
                    "command": ["/bin/sh", "-c", f"touch {marker}-{name}; echo ran"],
                    "sandbox": sandbox,
                }
                assert client.post("/api/agents", json=body).status_code == 201
            plain = run_turn(client, "plain", "go")
            assert plain["state"] == "done" and plain["reply"] == "ran"
            assert (tmp_path / "marker-plain").exists()  # unsandboxed: it could write there
            boxed = run_turn(client, "boxed", "go")
            assert boxed["state"] == "failed"
            assert boxed["error"] == f"sandbox unavailable: {reason}"
            assert not (tmp_path / "marker-boxed").exists()
    finally:
        daemon.stop()
    banner = (data.parent / f"{data.name}-daemon.log").read_text()
    assert f"sandbox: OFF for agents without their own setting: {reason}" in banner


def test_s3_required_refuses_off_and_fails_a_stored_off_agent(tmp_path: Path) -> None:
    """S3: under required, a POST/PATCH of "off" is a 400, and an agent already stored as
    off fails its turns with that reason (its command's marker file never appears)."""
    data = tmp_path / "data"
    marker = tmp_path / "marker"
    first = DaemonProcess(data, "--no-demo", "--sandbox", "off")
    with httpx.Client(base_url=first.url, timeout=30) as client:
        body = {
            "name": "old",
            "channel": "old",
            "backend": "command",
            "command": ["/bin/sh", "-c", f"touch {marker}"],
            "sandbox": "off",
        }
        assert client.post("/api/agents", json=body).status_code == 201
    first.stop()
    second = DaemonProcess(data, "--no-demo", "--sandbox", "required")
    try:
        with httpx.Client(base_url=second.url, timeout=30) as client:
            refusal = "sandbox off is not allowed: the daemon runs with --sandbox required"
            new = client.post(
                "/api/agents",
                json={"name": "n", "channel": "n", "backend": "echo", "sandbox": "off"},
            )
            assert new.status_code == 400 and new.json()["error"] == refusal
            assert new.json()["field"] == "sandbox"
            patch = client.patch("/api/agents/old", json={"sandbox": "off"})
            assert patch.status_code == 400 and patch.json()["error"] == refusal
            message = run_turn(client, "old", "go")
            assert message["state"] == "failed" and message["error"] == refusal
            assert not marker.exists()
            assert client.get("/health").json()["sandbox"]["required"] is True
    finally:
        second.stop()


# -- T5 for command turns and a daemon killed with SIGKILL (S13, S21) ----------------

NAMESPACE_FIRST = "readlink /proc/self/ns/pid > ns.txt; "


def wait_for(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


def test_t5_a_command_turn_that_exits_takes_its_setsid_child_along(
    escape_daemon: tuple[DaemonProcess, httpx.Client],
) -> None:
    daemon, client = escape_daemon
    body = {
        "name": "quick",
        "channel": "quick",
        "backend": "command",
        "command": ["/bin/sh", "-c", NAMESPACE_FIRST + "setsid sleep 300 & echo bye; exit 0"],
    }
    assert client.post("/api/agents", json=body).status_code == 201
    message = run_turn(client, "quick", "go")
    assert (message["state"], message["reply"]) == ("done", "bye")
    namespace = (daemon.data_dir / "workspaces" / "quick" / "ns.txt").read_text().strip()
    assert namespace != namespace_of(os.getpid())
    wait_for(lambda: not alive_in(namespace), 1.0, f"left in {namespace}: {alive_in(namespace)}")


def test_t5_a_daemon_killed_with_sigkill_takes_every_sandbox_along(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = DaemonProcess(data, "--no-demo")
    stubborn = NAMESPACE_FIRST + "(setsid sleep 300 &); trap '' TERM; sleep 300"
    try:
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            body = {
                "name": "s",
                "channel": "s",
                "backend": "command",
                "command": ["/bin/sh", "-c", stubborn],
            }
            assert client.post("/api/agents", json=body).status_code == 201
            client.post("/api/channels/s/messages", json={"content": "go"}).raise_for_status()
        ns_file = data / "workspaces" / "s" / "ns.txt"
        wait_for(
            lambda: ns_file.exists() and len(alive_in(ns_file.read_text().strip())) >= 4,
            20,
            "no sandbox",
        )
        namespace = ns_file.read_text().strip()
    finally:
        daemon.kill()
    wait_for(lambda: not alive_in(namespace), 1.0, f"left in {namespace}: {alive_in(namespace)}")
