"""The sandbox's decisions (pure: the bwrap argv, the env, modes, egress, the gateway's
routes), the relay on its own, and command turns in real /usr/bin/bwrap (S7-S12, S18,
S20, T7); the agent fields through a real daemon (S1, S2)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import Daemon
from skydeck.backends.command import CommandBackend
from skydeck.definitions import parse_definition
from skydeck.errors import BackendError, BadRequest, InvalidNote
from skydeck.model import AgentSpec, TurnSession
from skydeck.sandbox import Sandbox, bwrap_path, parse_policy, probe
from skydeck.sandbox.gateway import Deny, Forward, Gateway, Routes, Tunnel, hits_daemon, route
from skydeck.sandbox.jail import RELAY_SCRIPT
from skydeck.sandbox.modes import Availability, decide, names_daemon, parse_target
from skydeck.sandbox.plan import (
    PLACEHOLDER,
    HostLayout,
    Plan,
    Relay,
    bwrap_argv,
    decode_exit,
    probe_argv,
    program_to_bind,
    sandbox_env,
)
from skydeck.service import Service, Settings
from skydeck.validate import agent_changes, new_agent

LAYOUT = HostLayout((("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")))
NAMESPACES = [
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup",
    "--unshare-net",
    "--hostname",
    "skydeck",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--disable-userns",
]
SYSTEM = [
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
]  # fmt: skip
ETC = [
    arg
    for name in [
        "ssl",
        "ca-certificates",
        "pki",
        "alternatives",
        "passwd",
        "group",
        "nsswitch.conf",
        "hosts",
        "localtime",
        "ld.so.cache",
        "os-release",
    ]
    for arg in ("--ro-bind-try", f"/etc/{name}", f"/etc/{name}")
]
PRIVATE = ["--proc", "/proc", "--dev", "/dev", "--size", "536870912", "--tmpfs", "/tmp"]


# -- S7-S9: the command line ---------------------------------------------------------


def test_s7_s9_the_bwrap_argv_pins_every_flag_and_its_order() -> None:
    relay = Relay("/usr/bin/python3.11", Path("/src/relay.py"), Path("/tmp/s/1.sock"), "/opt/py")
    plan = Plan(
        bwrap="/usr/bin/bwrap",
        layout=LAYOUT,
        data_dir=Path("/data"),
        workspace=Path("/data/workspaces/a"),
        program="/opt/claude/bin/claude",
        relay=relay,
        status_fd=7,
        mcp_file=Path("/data/mcp/a.json"),
    )
    assert bwrap_argv(plan, ["/opt/claude/bin/claude", "-p", "--", "hi"]) == [
        "/usr/bin/bwrap",
        *NAMESPACES,
        *SYSTEM,
        *ETC,
        *PRIVATE,
        "--ro-bind", "/opt/claude/bin/claude", "/opt/claude/bin/claude",
        "--ro-bind", "/src/relay.py", "/run/skydeck/relay.py",
        "--ro-bind", "/tmp/s/1.sock", "/run/skydeck/gateway.sock",
        "--ro-bind", "/opt/py", "/opt/py",
        "--tmpfs", "/data",
        "--bind", "/data/workspaces/a", "/data/workspaces/a",
        "--ro-bind", "/data/mcp/a.json", "/data/mcp/a.json",
        "--remount-ro", "/data",
        "--chdir", "/data/workspaces/a",
        "--json-status-fd", "7",
        "--remount-ro", "/",
        "--",
        "/usr/bin/python3.11", "-I", "-S", "/run/skydeck/relay.py", "3128",
        "/run/skydeck/gateway.sock", "--",
        "/opt/claude/bin/claude", "-p", "--", "hi",
    ]  # fmt: skip


def test_s9_a_command_without_relay_sees_no_run_dir_and_no_program_bind() -> None:
    plan = Plan("/b", LAYOUT, Path("/d"), Path("/d/workspaces/c"), None, None, 5)
    argv = bwrap_argv(plan, ["cat"])
    assert "/run/skydeck/relay.py" not in argv and "/run/skydeck/gateway.sock" not in argv
    assert argv[-2:] == ["--", "cat"]
    assert program_to_bind("/usr/bin/cat", Path("/w")) is None
    assert program_to_bind("/bin/sh", Path("/w")) is None  # row 2 shows it
    assert program_to_bind("/w/tool.sh", Path("/w")) is None
    assert program_to_bind("/venv/bin/python", Path("/w")) == "/venv/bin/python"


def test_s5_the_probe_runs_the_turns_own_flags_and_rows() -> None:
    assert probe_argv("/usr/bin/bwrap", LAYOUT) == [
        "/usr/bin/bwrap",
        *NAMESPACES,
        *SYSTEM,
        *PRIVATE,
        "--remount-ro",
        "/",
        "--",
        "/usr/bin/true",
    ]


def test_s9_host_layout_reads_symlinks_and_directories(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib").mkdir()
    assert HostLayout.read(tmp_path) == HostLayout((("/bin", "usr/bin"), ("/lib", None)))


# -- S11: the environment --------------------------------------------------------------


def test_s11_workspace_claude_env_gets_proxies_the_agent_cannot_override() -> None:
    env = {"PATH": "/usr/bin", "HTTPS_PROXY": "http://evil:1", "NO_PROXY": "*", "K": "v"}
    out = sandbox_env(env, mode="workspace", claude=True, relay=True, credential=None)
    assert out == {
        "PATH": "/usr/bin",
        "K": "v",
        "IS_SANDBOX": "1",
        **dict.fromkeys(("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"), "http://127.0.0.1:3128"),
        "NO_PROXY": "",
        "no_proxy": "",
    }  # fmt: skip
    assert env["HTTPS_PROXY"] == "http://evil:1", "the input is not changed"


def test_s11_strict_claude_env_holds_only_the_placeholder() -> None:
    env = {
        "ANTHROPIC_API_KEY": "sk-real",
        "CLAUDE_CODE_OAUTH_TOKEN": "oauth",
        "ANTHROPIC_BASE_URL": "https://api.anthropic.com",
    }
    out = sandbox_env(env, mode="strict", claude=True, relay=True, credential="ANTHROPIC_API_KEY")
    assert out == {
        "ANTHROPIC_API_KEY": PLACEHOLDER,
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:3128",
        "IS_SANDBOX": "1",
    }


def test_s11_a_command_without_network_use_keeps_its_env() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/w"}
    assert sandbox_env(env, mode="workspace", claude=False, relay=False, credential=None) == env


def test_s12_exit_codes_above_128_are_signals() -> None:
    assert [decode_exit(code) for code in (0, 3, 128, 129, 137, 192, 193)] == [
        0,
        3,
        128,
        -1,
        -9,
        -64,
        193,
    ]


# -- S1-S3: modes and egress ----------------------------------------------------------

OK = Availability("/usr/bin/bwrap", "0.8.0")
MISSING = Availability("/x/bwrap", reason="bwrap not found at /x/bwrap (install ...)")


def test_s3_s6_decisions() -> None:
    assert decide(None, "auto", OK).mode == "workspace"
    assert decide(None, "auto", MISSING) == decide("off", "auto", MISSING)
    assert decide(None, "auto", MISSING).refusal is None
    assert decide(None, "strict", OK).mode == "strict"
    assert decide("off", "required", OK).refusal == (
        "sandbox off is not allowed: the daemon runs with --sandbox required"
    )
    assert decide("workspace", "off", MISSING).refusal == f"sandbox unavailable: {MISSING.reason}"
    assert decide(None, "required", OK).mode == "workspace"
    with pytest.raises(ValueError, match="--sandbox must be one of"):
        parse_policy("sometimes")


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("example.com", "example.com:443"),
        ("API.Example.com:8080", "api.example.com:8080"),
        ("10.0.0.1", "10.0.0.1:443"),
        ("[::1]:80", "[::1]:80"),
        ("[2001:db8::1]", "[2001:db8::1]:443"),
    ],
)
def test_s2_egress_targets(raw: str, target: str) -> None:
    assert parse_target(raw) == target


@pytest.mark.parametrize(
    "raw",
    ["", "https://example.com", "*.example.com", "x:0", "x:70000", "[zz]:1", "a b", "x:80/p"],
)
def test_s2_bad_egress_targets(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_target(raw)


def test_s1_s2_vault_definitions_carry_sandbox_and_egress() -> None:
    note = {
        "id": "n1",
        "content": "",
        "metadata": {"name": "v", "backend": "echo", "egress": "a.org, b.org:80 c.org"},
    }
    assert parse_definition(note).egress == ["a.org:443", "b.org:80", "c.org:443"]
    note["metadata"] = {"name": "v", "backend": "echo", "sandbox": "strict", "egress": ["x.org"]}
    with pytest.raises(InvalidNote, match="egress needs sandbox workspace"):
        parse_definition(note)
    note["metadata"] = {"name": "v", "backend": "echo", "sandbox": "off"}
    assert parse_definition(note).sandbox == "off"


def test_s1_s2_validation() -> None:
    base = {"name": "a", "channel": "a", "backend": "echo"}
    with pytest.raises(BadRequest) as bad:
        new_agent({**base, "sandbox": "tight"})
    assert (bad.value.message, bad.value.field) == (
        "sandbox must be one of: off, workspace, strict (or null)",
        "sandbox",
    )
    spec = new_agent({**base, "egress": ["example.com", "example.com:443", "1.2.3.4:80"]})
    assert spec.egress == ["example.com:443", "1.2.3.4:80"] and spec.sandbox is None
    for sandbox in ("off", "strict"):
        with pytest.raises(BadRequest, match=r"^egress needs sandbox workspace \(or null\)$"):
            new_agent({**base, "sandbox": sandbox, "egress": ["x.org"]})
    with pytest.raises(BadRequest, match="egress needs sandbox workspace"):
        agent_changes({"sandbox": "strict"}, spec)
    with pytest.raises(BadRequest, match="at most 32"):
        new_agent({**base, "egress": [f"h{i}.org" for i in range(33)]})
    with pytest.raises(BadRequest) as bad:
        new_agent({**base, "egress": ["ok.org", "http://x"]})
    assert bad.value.field == "egress[1]"


# -- S17: the gateway's routes ---------------------------------------------------------

WORKSPACE = Routes(
    agent="a",
    mode="workspace",
    allow=frozenset({"127.0.0.1:8080", "api.anthropic.com:443"}),
    daemon_port=1941,
    mcp_channel="chan",
    daemon_base="http://127.0.0.1:1941",
)
STRICT = Routes(
    agent="s",
    mode="strict",
    daemon_port=1941,
    upstream="https://api.anthropic.com",
    credential=("x-api-key", "sk-real"),
)


def test_s17_a_the_agents_own_mcp_route_goes_to_the_daemon() -> None:
    headers = [("Host", "127.0.0.1:3128"), ("Authorization", "Bearer turn-token")]
    for target in ("/mcp/chan", "http://127.0.0.1:3128/mcp/chan"):
        decision = route(WORKSPACE, "POST", target, headers)
        assert decision == Forward(
            "http://127.0.0.1:1941/mcp/chan",
            [("host", "127.0.0.1:1941"), ("Authorization", "Bearer turn-token")],
            close=True,
        )
    assert isinstance(route(WORKSPACE, "POST", "/mcp/other", headers), Deny)
    assert isinstance(route(STRICT, "POST", "/mcp/chan", headers), Forward)  # no MCP: model API
    assert route(STRICT, "POST", "/mcp/chan", headers).url.startswith("https://api.anthropic")  # type: ignore[union-attr]


def test_s17_b_strict_sends_origin_form_to_the_api_with_the_real_key() -> None:
    headers = [
        ("Host", "127.0.0.1:3128"),
        ("x-api-key", PLACEHOLDER),
        ("Authorization", "Bearer x"),
        ("Connection", "keep-alive"),
        ("Content-Length", "2"),
        ("anthropic-version", "2023-06-01"),
    ]
    assert route(STRICT, "POST", "/v1/messages?beta=true", headers) == Forward(
        "https://api.anthropic.com/v1/messages?beta=true",
        [
            ("host", "api.anthropic.com"),
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", "sk-real"),
        ],
    )
    assert route(STRICT, "CONNECT", "api.anthropic.com:443", []) == Deny("api.anthropic.com:443")
    assert route(STRICT, "GET", "http://127.0.0.1:8080/", []) == Deny("127.0.0.1:8080")


def test_s17_c_workspace_tunnels_and_forwards_only_allowlisted_targets() -> None:
    assert route(WORKSPACE, "CONNECT", "API.anthropic.com:443", []) == Tunnel(
        "api.anthropic.com:443"
    )
    forward = route(WORKSPACE, "POST", "http://127.0.0.1:8080/v1/messages", [("Host", "h")])
    assert forward == Forward(
        "http://127.0.0.1:8080/v1/messages",
        [("host", "127.0.0.1:8080")],
        target="127.0.0.1:8080",
    )


def test_s17_d_everything_else_is_denied() -> None:
    assert route(WORKSPACE, "CONNECT", "example.com:443", []) == Deny("example.com:443")
    assert route(WORKSPACE, "GET", "http://127.0.0.1:1941/api/agents", []) == Deny("127.0.0.1:1941")
    assert route(WORKSPACE, "GET", "http://127.0.0.1:9/", []) == Deny("127.0.0.1:9")
    assert route(WORKSPACE, "GET", "ftp://x/", []) == Deny("ftp://x/")
    assert route(WORKSPACE, "POST", "/v1/messages", [("Host", "127.0.0.1:3128")]) == Deny(
        "127.0.0.1:3128"
    )


def test_s18_a_checked_name_is_sent_to_the_address_it_resolved_to() -> None:
    """No second lookup (DNS rebinding): the checked address, the name in Host."""
    forward = Forward(
        "http://api.example:8080/v1/messages?x=1",
        [("host", "api.example:8080")],
        target="api.example:8080",
        address="203.0.113.7",
    )
    assert forward.url_to_send() == "http://203.0.113.7:8080/v1/messages?x=1"
    six = Forward("http://h.example/", [], target="h.example:80", address="2001:db8::1")
    assert six.url_to_send() == "http://[2001:db8::1]:80/"
    assert Forward("http://127.0.0.1:1941/mcp/c", []).url_to_send() == "http://127.0.0.1:1941/mcp/c"


def test_s18_a_name_resolving_to_loopback_on_the_daemon_port_is_caught() -> None:
    assert hits_daemon(["127.0.0.1"], 1941, 1941)
    assert hits_daemon(["::ffff:10.0.0.1", "0.0.0.0"], 1941, 1941)
    assert not hits_daemon(["127.0.0.1"], 8080, 1941)
    assert not hits_daemon(["93.184.216.34"], 1941, 1941)
    # IPv4-mapped loopback reaches 127.0.0.1; Python 3.11 does not call it loopback.
    assert hits_daemon(["::ffff:127.0.0.1"], 1941, 1941)
    assert names_daemon(["[::ffff:127.0.0.1]:1941"], 1941)
    assert not names_daemon(["[::ffff:10.0.0.1]:1941"], 1941)


async def test_s18_s19_a_networked_sandbox_waits_for_the_daemon_port(tmp_path: Path) -> None:
    """A turn replayed at start builds its sandbox before the server listens: its
    gateway must still know the daemon's port, so it waits for it."""
    found = probe(bwrap_path(None))
    sandbox = Sandbox("workspace", found, data_dir=tmp_path, await_listener=True)
    routes = Routes(agent="a", mode="workspace", allow=frozenset({"127.0.0.1:9"}))
    got: list[Routes] = []

    async def build() -> None:
        got.append(await sandbox.routes_now(routes))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(build)
        await trio.sleep(0.05)
        assert got == [], "no gateway before the port is known"
        sandbox.listening("http://127.0.0.1:4242")
    assert got[0].daemon_port == 4242


# -- S16: the relay --------------------------------------------------------------------


@contextmanager
def unix_echo(path: Path) -> Iterator[None]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(b"echo:" + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay(port: int, sock: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", str(RELAY_SCRIPT), str(port), str(sock), "--", *argv],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_s16_the_relay_listens_before_the_child_starts_and_pipes_to_the_socket(
    tmp_path: Path,
) -> None:
    sock, port = tmp_path / "g.sock", free_port()
    client = (
        f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
        "s.sendall(b'ping'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())"
    )
    with unix_echo(sock):
        done = relay(port, sock, sys.executable, "-c", client)
    assert (done.returncode, done.stdout) == (0, "echo:ping\n"), done.stderr


def test_s16_the_relay_exits_like_its_child(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    assert relay(free_port(), sock, "/bin/sh", "-c", "exit 3").returncode == 3
    assert relay(free_port(), sock, "/bin/sh", "-c", "kill -9 $$").returncode == 137
    missing = relay(free_port(), sock, "/nonexistent/x")
    assert missing.returncode == 127 and "cannot run /nonexistent/x" in missing.stderr


# -- command turns in real bwrap (S8, S12) --------------------------------------------


@pytest.fixture
def boxed(tmp_path: Path) -> CommandBackend:
    found = probe(bwrap_path(None))
    assert found.available, found.reason
    return CommandBackend(
        tmp_path / "workspaces", sandbox=Sandbox("workspace", found, data_dir=tmp_path)
    )


def command(name: str, argv: list[str], **kwargs: Any) -> AgentSpec:
    return AgentSpec(name=name, channel=name, backend="command", command=argv, **kwargs)


async def run(backend: CommandBackend, spec: AgentSpec, prompt: str = "") -> str:
    result = await backend.deliver(spec, prompt, TurnSession("s", False), lambda *_: None)
    return result.reply


INSIDE = r"""
grep CapEff /proc/self/status
unshare -U true 2>/dev/null && echo "userns ok" || echo "userns denied"
echo "host $(hostname)"
echo "pids $(ls /proc | grep -c '^[0-9]')"
awk '{print $5}' /proc/self/mountinfo | sort -u | tr '\n' ' '
"""


async def test_s8_s9_inside_no_caps_no_userns_own_hostname_own_pids_own_mounts(
    boxed: CommandBackend, tmp_path: Path
) -> None:
    reply = await run(boxed, command("inside", ["/bin/bash", "-c", INSIDE]))
    lines = reply.splitlines()
    assert lines[0].split() == ["CapEff:", "0000000000000000"]
    assert lines[1:3] == ["userns denied", "host skydeck"]
    assert int(lines[3].split()[1]) <= 6, "bwrap's init, bash, its pipeline: no host pid"
    mounts = set(lines[4].split())
    workspace = str((tmp_path / "workspaces" / "inside").resolve())
    expected = {"/", "/usr", "/proc", "/dev", "/tmp", str(tmp_path.resolve()), workspace}
    assert expected <= mounts, mounts
    etc = {m for m in mounts if m.startswith("/etc/")}
    assert etc <= {"/etc/ssl", "/etc/ca-certificates", "/etc/passwd", "/etc/group",
                   "/etc/nsswitch.conf", "/etc/hosts", "/etc/localtime", "/etc/ld.so.cache",
                   "/etc/os-release", "/etc/alternatives", "/etc/pki"}, etc  # fmt: skip
    # bwrap's own: read-only covers inside /proc, /dev's devices and its pts/shm/mqueue.
    rest = {m for m in mounts - expected - etc if not m.startswith(("/proc/", "/dev/"))}
    assert rest == set(), rest


async def test_s12_a_program_exit_keeps_r31_wording(boxed: CommandBackend) -> None:
    failing = command("f", ["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(BackendError, match=r"^oops$"):
        await run(boxed, failing)
    killed = command("k", ["sh", "-c", "kill -9 $$"])
    with pytest.raises(BackendError, match=r"^command killed by SIGKILL$"):
        await run(boxed, killed)


async def test_s6_s12_a_sandbox_that_cannot_start_the_program_says_so(
    boxed: CommandBackend, tmp_path: Path
) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/nonexistent/interpreter\necho never\n")
    script.chmod(0o755)
    spec = command("bad", [str(script)])
    with pytest.raises(BackendError) as failed:
        await run(boxed, spec)
    assert failed.value.message == (
        f"sandbox failed to start: bwrap: execvp {script}: No such file or directory"
    )


async def test_s6_required_mode_without_bwrap_never_runs_the_program(tmp_path: Path) -> None:
    missing = probe("/nonexistent/bwrap")
    backend = CommandBackend(
        tmp_path / "workspaces", sandbox=Sandbox("auto", missing, data_dir=tmp_path)
    )
    marker = tmp_path / "marker"
    spec = command("m", ["sh", "-c", f"touch {marker}"], sandbox="workspace")
    with pytest.raises(BackendError) as failed:
        await run(backend, spec)
    assert failed.value.message == (
        "sandbox unavailable: bwrap not found at /nonexistent/bwrap "
        "(install the bubblewrap package)"
    )
    assert not marker.exists()


# -- T7 and S1/S2 through a daemon ----------------------------------------------------

FETCH = """
import sys, urllib.request, urllib.error
for target in sys.stdin.read().split():
    try:
        with urllib.request.urlopen(f"http://{target}/", timeout=10) as answer:
            print(target, answer.status, answer.read().decode())
    except urllib.error.HTTPError as error:
        print(target, error.code, error.read().decode().strip())
    except OSError as error:
        print(target, "error", error)
"""


@contextmanager
def answering(text: str) -> Iterator[int]:
    """A loopback HTTP server answering ``text`` to every GET."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def wait_reply(client: httpx.AsyncClient, channel: str, content: str) -> str:
    ack = (await client.post(f"/api/channels/{channel}/messages", json={"content": content})).json()
    with trio.fail_after(60):
        while True:
            message = (await client.get(f"/api/messages/{ack['id']}")).json()
            if message["state"] in ("done", "failed"):
                break
            await trio.sleep(0.05)
    assert message["state"] == "done", message["error"]
    reply = (await client.get(f"/api/messages/{message['reply_id']}")).json()
    return str(reply["content"])


async def test_t7_s20_each_agent_reaches_only_its_own_egress_at_the_same_time(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="skydeck.turn")
    client = daemon.client
    with answering("one") as one, answering("two") as two:
        targets = f"127.0.0.1:{one} 127.0.0.1:{two}"
        for name, port in (("first", one), ("second", two)):
            body = {
                "name": name,
                "channel": name,
                "backend": "command",
                # Not `python3` from PATH: here that is a pyenv shim, a script whose
                # helpers the sandbox does not see (S9: P must be self-contained).
                "command": ["/usr/bin/python3", "-c", FETCH],
                "egress": [f"127.0.0.1:{port}"],
            }
            assert (await client.post("/api/agents", json=body)).status_code == 201
        replies: dict[str, str] = {}

        async def ask(name: str) -> None:
            replies[name] = await wait_reply(client, name, targets)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first")
            nursery.start_soon(ask, "second")
    assert replies["first"].splitlines() == [
        f"127.0.0.1:{one} 200 one",
        f"127.0.0.1:{two} 403 skydeck sandbox: 127.0.0.1:{two} is not allowed for agent first",
    ]
    assert replies["second"].splitlines() == [
        f"127.0.0.1:{one} 403 skydeck sandbox: 127.0.0.1:{one} is not allowed for agent second",
        f"127.0.0.1:{two} 200 two",
    ]
    finished = [r for r in caplog.records if r.getMessage() == "turn finished"]
    assert [getattr(r, "sandbox", None) for r in finished] == ["workspace", "workspace"]  # S23


@asynccontextmanager
async def serving(data: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    service = Service(Settings(port=0, data_dir=data, **settings))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
            yield client
        service.stop()


async def test_s1_s2_fields_round_trip_and_the_daemon_refuses_itself(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as client:
        port = str(client.base_url).rstrip("/").rsplit(":", 1)[1]
        body = {"name": "a", "channel": "a", "backend": "echo", "egress": ["example.org"]}
        created = (await client.post("/api/agents", json=body)).json()
        assert (created["sandbox"], created["egress"]) == (None, ["example.org:443"])
        assert created["sandbox_effective"] == "workspace"
        patched = (await client.patch("/api/agents/a", json={"sandbox": "workspace"})).json()
        assert patched["sandbox"] == "workspace"
        for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0"):
            refused = await client.patch("/api/agents/a", json={"egress": [f"{host}:{port}"]})
            assert refused.status_code == 400, host
            assert refused.json() == {
                "ok": False,
                "error": "egress cannot name skydeck itself",
                "field": "egress",
            }
        assert (await client.patch("/api/agents/a", json={"egress": ["127.0.0.1:9"]})).is_success
        strict = await client.patch("/api/agents/a", json={"sandbox": "strict"})
        assert strict.json()["error"] == "egress needs sandbox workspace (or null)"
        off = (await client.patch("/api/agents/a", json={"sandbox": "off", "egress": []})).json()
        assert (off["sandbox"], off["sandbox_effective"]) == ("off", "off")
    async with serving(tmp_path / "data", sandbox="strict") as client:  # a restart keeps them
        stored = (await client.get("/api/agents/a")).json()
        assert (stored["sandbox"], stored["egress"]) == ("off", [])
        await client.patch("/api/agents/a", json={"sandbox": None})
        assert (await client.get("/api/agents/a")).json()["sandbox_effective"] == "strict"


async def test_s17_every_request_on_one_connection_is_routed_by_its_own_head(
    tmp_path: Path,
) -> None:
    """The CLI reuses a proxy connection for another target: each head decides (S17)."""
    with answering("one") as one, answering("two") as two:
        routes = Routes(
            agent="reuser",
            mode="workspace",
            allow=frozenset({f"127.0.0.1:{one}", f"127.0.0.1:{two}"}),
        )
        denied: list[tuple[str, str]] = []
        async with httpx.AsyncClient(trust_env=False) as upstream:
            gateway = Gateway(
                routes, tmp_path / "g.sock", upstream, lambda *hit: denied.append(hit)
            )
            gateway.listen()
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                stream = await trio.open_unix_socket(str(tmp_path / "g.sock"))
                heads = [
                    f"GET http://127.0.0.1:{one}/ HTTP/1.1\r\nHost: 127.0.0.1:{one}\r\n\r\n",
                    f"POST http://127.0.0.1:{two}/ HTTP/1.1\r\nHost: 127.0.0.1:{two}\r\n"
                    "Content-Length: 2\r\nExpect: 100-continue\r\n\r\nhi",
                    "GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
                ]
                await stream.send_all("".join(heads).encode())
                received = b""
                with trio.fail_after(10):
                    while b"is not allowed" not in received:
                        received += await stream.receive_some(65536)
                await stream.aclose()
                nursery.cancel_scope.cancel()
    text = received.decode()
    assert text.count("HTTP/1.1 200") == 2 and "one" in text and "two" in text, text
    assert "HTTP/1.1 100" in text, "Expect: 100-continue is answered before the body"
    assert "403" in text and "127.0.0.1:9 is not allowed for agent reuser" in text, text
    assert denied == [("reuser", "127.0.0.1:9")]
    assert not (tmp_path / "g.sock").exists(), "S13: the socket goes with its gateway"


def test_s5_banner_lines(tmp_path: Path) -> None:
    def banner(policy: str, found: Availability) -> str:
        return Sandbox(parse_policy(policy), found, data_dir=tmp_path).banner()

    assert banner("auto", OK) == (
        "sandbox: workspace for agents without their own setting (bwrap 0.8.0 at /usr/bin/bwrap)"
    )
    assert banner("auto", MISSING) == (
        f"sandbox: OFF for agents without their own setting: {MISSING.reason}"
    )
    assert banner("off", OK) == "sandbox: OFF for agents without their own setting: --sandbox off"
    assert banner("strict", MISSING) == (
        "sandbox: strict for agents without their own setting, but unavailable, "
        f"so their turns fail: {MISSING.reason}"
    )
