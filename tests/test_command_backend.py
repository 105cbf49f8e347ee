"""R31 with real processes: stdin in, stdout out, stderr tail on failure, a
minimal environment, and no process left behind when a turn is stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest
import trio

from helpers import make_store, post, reply_of, running_registry, settle
from skydeck.backends import CommandBackend
from skydeck.model import AgentSpec
from skydeck.registry import Registry
from skydeck.store import Store

PY = sys.executable


def command_agent(name: str, argv: list[str], **kwargs: object) -> AgentSpec:
    return AgentSpec(name=name, channel=name, backend="command", command=argv, **kwargs)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def wait_for_file(path: Path, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while not path.exists() or not path.read_text().strip():
            await trio.sleep(0.02)
    return path.read_text().strip()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path)


def backends(tmp_path: Path) -> dict[str, object]:
    return {"command": CommandBackend(tmp_path / "workspaces")}


async def test_r31_prompt_on_stdin_verbatim_reply_on_stdout(tmp_path: Path, store: Store) -> None:
    agents = [command_agent("cat", ["cat"])]
    async with running_registry(store, agents=agents, backends=backends(tmp_path)) as registry:  # type: ignore[arg-type]
        ids = [
            await post(registry, "cat", "-v --help"),
            await post(registry, "cat", "multi\nline\n\n"),
        ]
        flag, multi = await settle(store, ids, timeout=30)
    assert (await reply_of(store, flag)).content == "-v --help"
    assert (await reply_of(store, multi)).content == "multi\nline", "trailing whitespace stripped"


async def test_r31_nonzero_exit_fails_with_stderr_tail(tmp_path: Path, store: Store) -> None:
    script = "import sys; sys.stderr.write('x' * 3000 + 'END\\n'); sys.exit(3)"
    agents = [command_agent("bad", [PY, "-c", script]), command_agent("gone", ["/no/such/prog"])]
    async with running_registry(store, agents=agents, backends=backends(tmp_path)) as registry:  # type: ignore[arg-type]
        bad, gone = await settle(
            store,
            [await post(registry, "bad", "hi"), await post(registry, "gone", "hi")],
            timeout=30,
        )
    assert bad.state == "failed"
    assert bad.error == ("x" * 3000 + "END\n")[-2000:].strip(), "last 2,000 characters, stripped"
    assert (gone.state, gone.error) == ("failed", "command not found: /no/such/prog")


async def test_r31_minimal_environment_keeps_daemon_secrets_out(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYDECK_TOKEN", "daemon-secret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    agents = [command_agent("env", [PY, "-c", dump], env={"AGENT_VAR": "mine"})]
    async with running_registry(store, agents=agents, backends=backends(tmp_path)) as registry:  # type: ignore[arg-type]
        (message,) = await settle(store, [await post(registry, "env", "x")], timeout=30)
    import json

    env = json.loads((await reply_of(store, message)).content)
    assert "daemon-secret-token" not in json.dumps(env)
    assert "cloud-secret" not in json.dumps(env)
    assert env["AGENT_VAR"] == "mine"
    assert env["HOME"] == str(tmp_path / "workspaces" / "env")
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "AGENT_VAR", "LC_CTYPE", "PWD"}


SPAWNER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open("pids.tmp", "w").write(f"{os.getpid()} {child.pid}")
os.rename("pids.tmp", "pids")
time.sleep(300)
"""


async def _start_spawner(tmp_path: Path, registry: Registry, name: str) -> tuple[str, list[int]]:
    message_id = await post(registry, name, "go")
    pids = await wait_for_file(tmp_path / "workspaces" / name / "pids")
    procs = [int(p) for p in pids.split()]
    assert all(alive(p) for p in procs)
    return message_id, procs


async def test_r26_deregister_mid_turn_kills_the_whole_process_group(
    tmp_path: Path, store: Store
) -> None:
    agents = [command_agent("spawner", [PY, "-c", SPAWNER])]
    async with running_registry(store, agents=agents, backends=backends(tmp_path)) as registry:  # type: ignore[arg-type]
        message_id, procs = await _start_spawner(tmp_path, registry, "spawner")
        await registry.remove("spawner")
        with trio.fail_after(10):
            while any(alive(p) for p in procs):
                await trio.sleep(0.05)
    message = await store.get_message(message_id)
    assert message is not None and message.state == "cancelled"
    assert not any(alive(p) for p in procs), "no orphan process left"


async def test_r14_timeout_kills_the_process_group(tmp_path: Path, store: Store) -> None:
    agents = [command_agent("slow", [PY, "-c", SPAWNER], timeout_s=2)]
    async with running_registry(store, agents=agents, backends=backends(tmp_path)) as registry:  # type: ignore[arg-type]
        message_id, procs = await _start_spawner(tmp_path, registry, "slow")
        (message,) = await settle(store, [message_id], timeout=20)
    assert (message.state, message.error) == ("failed", "turn timed out after 2 s")
    assert not any(alive(p) for p in procs)


def test_minimal_env_does_not_leak_unknown_variables() -> None:
    os.environ["SKYDECK_JWT_SECRET"] = "s"
    try:
        from skydeck.backends.process import minimal_env

        env = minimal_env(AgentSpec(name="a", channel="a"), Path("/tmp/home"))
        assert "SKYDECK_JWT_SECRET" not in env
        assert env["HOME"] == "/tmp/home"
    finally:
        del os.environ["SKYDECK_JWT_SECRET"]
