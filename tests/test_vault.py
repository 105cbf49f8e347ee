"""Parachute Vault interop: a real daemon against a fake vault on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from fake_vault import TOKEN, FakeVault
from helpers import ScriptBackend, make_store, running_registry
from skydeck.definitions import VaultSync
from skydeck.model import AgentSpec
from skydeck.scheduler import Scheduler, TrioWallClock
from skydeck.service import Service, Settings
from skydeck.transports.vault import VaultClient, VaultMirror

DEF = "#agent/definition"


def definition(vault: FakeVault, name: str, prompt: str = "", **metadata: str) -> dict[str, Any]:
    return vault.add(prompt, [DEF], {"name": name, "backend": "echo", **metadata}, f"Agents/{name}")


def trigger(note_id: str, channel: str, content: str, **metadata: str) -> dict[str, Any]:
    """The payload the vault POSTs for an inbound note (parachute-vault.md §2)."""
    return {
        "trigger": f"channel_inbound_{channel}",
        "event": "created",
        "note": {
            "id": note_id,
            "content": content,
            "path": f"channel/{channel}/{note_id}",
            "tags": ["#agent/message", "#agent/message/inbound"],
            "metadata": {
                "agent": channel,
                "direction": "inbound",
                "sender": "operator",
                "ts": "2026-06-24T10:31:07.120Z",
                **metadata,
            },
            "createdAt": "2026-06-24T10:31:07.123Z",
            "updatedAt": "2026-06-24T10:31:07.123Z",
        },
    }


@dataclass
class Rig:
    vault: FakeVault
    service: Service
    client: httpx.AsyncClient

    async def deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post("/api/vault/inbound", json=payload)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def settle(self, message_id: str, timeout: float = 20) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                message: dict[str, Any] = (
                    await self.client.get(f"/api/messages/{message_id}")
                ).json()
                if message["state"] in ("done", "failed", "cancelled"):
                    return message
                await trio.sleep(0.02)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    vault = FakeVault()
    definition(vault, "worker", "You do the work.")
    definition(vault, "boss")
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (vault_url,) = await nursery.start(serve, vault.app(), config)
        settings = Settings(
            port=0,
            data_dir=tmp_path / "data",
            demo=False,
            vault_url=vault_url,
            vault_token=TOKEN,
            vault_poll_s=0.2,
        )
        service = Service(settings)
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with trio.fail_after(10):
                while len(service.registry.agents()) < 2:
                    await trio.sleep(0.02)
            yield Rig(vault, service, client)
        service.stop()
        nursery.cancel_scope.cancel()


async def test_trigger_in_reply_thread_and_callback_notes_out(rig: Rig) -> None:
    ack = await rig.deliver(
        trigger(
            "n-1",
            "worker",
            "do the thing",
            reply_to="boss",
            correlation_id="c-9",
            delegation_depth="1",
        )
    )
    assert set(ack) == {"ok", "id", "state"}, "no content/metadata keys: the vault would apply them"
    inbound = await rig.settle(ack["id"])
    assert inbound["state"] == "done"
    (reply,) = rig.vault.tagged("#agent/message/outbound")
    assert reply["tags"] == ["#agent/message", "#agent/message/outbound"]
    assert reply["path"].startswith("channel/worker/") and reply["content"] == "echo: do the thing"
    assert {
        k: reply["metadata"][k] for k in ("agent", "direction", "sender", "in_reply_to", "thread")
    } == {
        "agent": "worker",
        "direction": "outbound",
        "sender": "session",
        "in_reply_to": "n-1",
        "thread": inbound["thread_id"],
    }
    thread = rig.vault.by_path("Threads/worker/worker")
    assert thread is not None and thread["tags"] == ["#agent/thread"]
    meta = thread["metadata"]
    assert (meta["agent"], meta["mode"], meta["status"], meta["turn_count"]) == (
        "worker",
        "single-threaded",
        "ok",
        "1",
    )
    assert meta["session"] and meta["definition"] and "last_turn_at" in meta
    assert "**Reply:** echo: do the thing" in thread["content"]
    with trio.fail_after(10):
        while not [
            n for n in rig.vault.tagged("#agent/message/inbound") if n["metadata"].get("callback")
        ]:
            await trio.sleep(0.02)
    (callback,) = [
        n for n in rig.vault.tagged("#agent/message/inbound") if n["metadata"].get("callback")
    ]
    assert callback["path"].startswith("channel/boss/")
    assert callback["content"].startswith("[callback] worker finished (ok) — see source_message")
    cb = callback["metadata"]
    assert {
        k: cb[k]
        for k in (
            "agent",
            "direction",
            "sender",
            "callback",
            "status",
            "source_channel",
            "source_thread",
            "source_message",
            "correlation_id",
            "delegation_depth",
        )
    } == {
        "agent": "boss",
        "direction": "inbound",
        "sender": "callback:worker",
        "callback": "true",
        "status": "ok",
        "source_channel": "worker",
        "source_thread": inbound["thread_id"],
        "source_message": reply["id"],
        "correlation_id": "c-9",
        "delegation_depth": "2",
    }
    assert "reply_to" not in cb
    boss_local = (await rig.client.get("/api/channels/boss/messages")).json()["messages"]
    assert boss_local == [], "R22a: a vault sender's callback is written only to the vault"


async def test_single_threaded_second_turn_resumes_the_session_from_the_thread_note(
    rig: Rig,
) -> None:
    backend = ScriptBackend()
    rig.service.deps.backends["echo"] = backend  # type: ignore[index]
    first = await rig.deliver(trigger("n-1", "worker", "one"))
    await rig.settle(first["id"])
    session = rig.vault.by_path("Threads/worker/worker")["metadata"]["session"]  # type: ignore[index]
    await rig.service.store.clear_session("worker")  # as if moved over from parachute-agent
    second = await rig.deliver(trigger("n-2", "worker", "two"))
    await rig.settle(second["id"])
    assert [(c.session.id, c.session.resume) for c in backend.calls][1] == (session, True)


async def test_r17_single_threaded_thread_note_started_once_counts_every_turn(rig: Rig) -> None:
    """Issue 12 §1 / parachute-vault.md §4: one upserted note, started_at set once."""
    started = []
    thread_ids = set()
    for i in range(3):
        ack = await rig.deliver(trigger(f"n-{i}", "worker", f"turn {i}"))
        thread_ids.add((await rig.settle(ack["id"]))["thread_id"])
        note = rig.vault.by_path("Threads/worker/worker")
        assert note is not None
        started.append(note["metadata"]["started_at"])
        turn_counts = note["metadata"]["turn_count"]
        await trio.sleep(0.01)
    assert len(set(started)) == 1, started
    assert turn_counts == "3"
    assert len(thread_ids) == 1
    (local,) = await rig.service.store.list_threads("worker")
    assert (local.id, local.started_at, local.turn_count) == (thread_ids.pop(), started[0], 3)


async def test_503_burst_then_success_is_retried_with_exact_attempts(rig: Rig) -> None:
    rig.vault.fail("POST", "/notes", 503, 503)
    ack = await rig.deliver(trigger("n-1", "worker", "retry me"))
    message = await rig.settle(ack["id"])
    assert message["state"] == "done"
    assert rig.vault.attempts("POST", "/notes") == 3
    assert len(rig.vault.tagged("#agent/message/outbound")) == 1


async def test_400_is_not_retried_and_recorded_as_r21(rig: Rig) -> None:
    rig.vault.fail("POST", "/notes", 400)
    ack = await rig.deliver(trigger("n-1", "worker", "rejected"))
    message = await rig.settle(ack["id"])
    assert rig.vault.attempts("POST", "/notes") == 1
    assert message["state"] == "failed" and message["error"].startswith("outbound write failed")
    (thread,) = (await rig.client.get("/api/threads", params={"channel": "worker"})).json()[
        "threads"
    ]
    assert thread["status"] == "error" and thread["turn_count"] == 1
    assert thread["output"].startswith("reply produced but NOT delivered (outbound write failed: ")
    assert thread["output"].endswith("Undelivered reply text: echo: rejected")
    assert await rig.service.store.outbox_count() == 0, "a 4xx is permanent: not queued"


async def test_vault_down_then_back_delivers_the_reply_and_loses_nothing(rig: Rig) -> None:
    rig.vault.down = True
    ack = await rig.deliver(trigger("n-1", "worker", "while down", reply_to="boss"))
    failed = await rig.settle(ack["id"])
    assert failed["state"] == "failed"
    health = (await rig.client.get("/health")).json()
    assert health["vault"]["outbox"] >= 1
    assert "skydeck_vault_outbox" in (await rig.client.get("/metrics")).text
    await trio.sleep(1.5)
    rig.vault.down = False
    with trio.fail_after(20):
        while not rig.vault.tagged("#agent/message/outbound"):
            await trio.sleep(0.05)
    (reply,) = rig.vault.tagged("#agent/message/outbound")
    assert reply["content"] == "echo: while down"
    with trio.fail_after(10):
        while (await rig.client.get(f"/api/messages/{ack['id']}")).json()["state"] != "done":
            await trio.sleep(0.05)
    (thread,) = (await rig.client.get("/api/threads", params={"channel": "worker"})).json()[
        "threads"
    ]
    assert (thread["status"], thread["turn_count"]) == ("ok", 1), "same turn, not counted twice"
    callbacks = [
        n for n in rig.vault.tagged("#agent/message/inbound") if n["metadata"].get("callback")
    ]
    assert [c["metadata"]["status"] for c in callbacks] == ["error"], "no second callback"
    assert (await rig.client.get("/health")).json()["vault"]["outbox"] == 0
    # At least once: an item whose removal was lost comes again; it changes nothing.
    message = (await rig.client.get(f"/api/messages/{ack['id']}")).json()
    assert rig.service.vault is not None
    await rig.service.vault._deliver(
        "reply", {"message_id": message["reply_id"], "thread_id": message["thread_id"]}
    )
    assert len(rig.vault.tagged("#agent/message/outbound")) == 1
    assert (await rig.client.get(f"/api/messages/{ack['id']}")).json()["state"] == "done"


async def test_duplicate_trigger_delivery_runs_one_turn(rig: Rig) -> None:
    backend = ScriptBackend()
    rig.service.deps.backends["echo"] = backend  # type: ignore[index]
    payload = trigger("n-dup", "worker", "once")
    first = await rig.deliver(payload)
    second = await rig.deliver(payload)
    assert second == {"ok": True, "id": first["id"], "state": "duplicate"}
    await rig.settle(first["id"])
    assert len(backend.calls) == 1


async def test_inbound_for_an_unknown_channel_is_buffered_not_401(rig: Rig) -> None:
    ack = await rig.deliver(trigger("n-early", "newcomer", "are you there?"))
    assert ack["state"] == "buffered"
    definition(rig.vault, "newcomer")
    assert (await rig.settle(ack["id"]))["state"] == "done"


async def test_reset_clears_the_thread_note_session(rig: Rig) -> None:
    ack = await rig.deliver(trigger("n-1", "worker", "hello"))
    await rig.settle(ack["id"])
    assert rig.vault.by_path("Threads/worker/worker")["metadata"]["session"]  # type: ignore[index]
    assert (await rig.client.post("/api/agents/worker/reset")).status_code == 200
    with trio.fail_after(10):
        while rig.vault.by_path("Threads/worker/worker")["metadata"]["session"]:  # type: ignore[index]
            await trio.sleep(0.05)


# -- definitions converge within one poll (autojump clock, in-process vault) ------


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault()


def in_process_client(vault: FakeVault) -> VaultClient:
    """The vault app without a socket, so Trio's autojump clock can drive the polls."""
    transport = httpx.ASGITransport(app=vault.app())  # type: ignore[arg-type]
    return VaultClient("http://vault.test", TOKEN, transport=transport)


async def test_definitions_add_edit_rename_delete_converge_within_one_poll(
    tmp_path: Path, autojump_clock: trio.abc.Clock, vault: FakeVault
) -> None:
    client = in_process_client(vault)
    store = make_store(tmp_path)
    note = definition(vault, "alpha", "be terse")
    async with running_registry(store) as registry:
        mirror = VaultMirror(client, store)
        sync = VaultSync(client, registry, mirror, None, poll_s=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            alpha = registry.get("alpha")
            assert (alpha.system_prompt, alpha.source) == ("be terse", f"vault:{note['id']}")
            assert mirror.serves("alpha")
            assert vault.notes[note["id"]]["metadata"]["status"] == "enabled"
            updated_at = vault.notes[note["id"]]["updatedAt"]

            await trio.sleep(61)  # a quiet poll writes nothing back (no churn)
            assert vault.notes[note["id"]]["updatedAt"] == updated_at

            vault.notes[note["id"]]["content"] = "be verbose"  # edit
            vault.notes[note["id"]]["metadata"]["mode"] = "multi-threaded"
            definition(vault, "beta")  # add
            await trio.sleep(60)
            assert registry.get("alpha").system_prompt == "be verbose"
            assert registry.get("alpha").mode == "multi-threaded"
            assert registry.get("beta").backend == "echo"

            vault.notes[note["id"]]["metadata"]["name"] = "gamma"  # rename
            await trio.sleep(60)
            assert {a.name for a in registry.agents()} == {"beta", "gamma"}, "the old name stops"
            assert not mirror.serves("alpha")

            beta = next(n for n in vault.notes.values() if n["metadata"]["name"] == "beta")
            del vault.notes[beta["id"]]  # delete
            await trio.sleep(60)
            assert {a.name for a in registry.agents()} == {"gamma"}
            nursery.cancel_scope.cancel()


async def test_invalid_definition_is_reported_and_the_good_version_keeps_running(
    tmp_path: Path, autojump_clock: trio.abc.Clock, vault: FakeVault
) -> None:
    client = in_process_client(vault)
    store = make_store(tmp_path)
    good = definition(vault, "steady")
    definition(vault, "broken", backend="attached")
    vault.add("", [DEF], {"name": "../etc"}, "Agents/bad-name")
    async with running_registry(store) as registry:
        await registry.create(AgentSpec(name="local", channel="local", backend="echo"))
        definition(vault, "local")  # clashes with an API-created agent
        sync = VaultSync(client, registry, VaultMirror(client, store), None, poll_s=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            assert {a.name for a in registry.agents()} == {"steady", "local"}
            assert registry.get("local").source is None, "not overwritten"
            problems = {p["name"]: p["error"] for p in sync.health()}
            assert "attached" in problems["broken"]
            assert "name is required" in problems["../etc"]
            assert "already exists" in problems["local"]
            broken = next(n for n in vault.notes.values() if n["metadata"].get("name") == "broken")
            assert broken["metadata"]["status"] == "error"
            vault.notes[good["id"]]["metadata"]["mode"] = "sometimes"  # an invalid edit
            await trio.sleep(61)
            assert registry.get("steady").mode == "single-threaded", (
                "the good version keeps running"
            )
            assert "mode" in {p["name"]: p["error"] for p in sync.health()}["steady"]
            nursery.cancel_scope.cancel()


async def test_job_notes_become_cron_jobs_and_converge(
    tmp_path: Path, autojump_clock: trio.abc.Clock, vault: FakeVault
) -> None:
    client = in_process_client(vault)
    store = make_store(tmp_path)
    meta = {
        "jobId": "report",
        "agent": "alpha",
        "cron": "0 9 * * *",
        "tz": "Europe/Berlin",
        "enabled": "true",
    }
    note = vault.add("send the daily report", ["#agent/job"], meta, "Channels/alpha/jobs/report")
    vault.add(
        "x",
        ["#agent/job"],
        {"jobId": "bad", "agent": "alpha", "cron": "* * *"},
        "Channels/alpha/jobs/bad",
    )
    async with running_registry(store) as registry:
        scheduler = Scheduler(store, registry, TrioWallClock(datetime(2026, 1, 1, tzinfo=UTC)))
        sync = VaultSync(client, registry, VaultMirror(client, store), scheduler, poll_s=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            job = await scheduler.get("report")
            assert (job.channel, job.schedule, job.timezone, job.content) == (
                "alpha",
                "0 9 * * *",
                "Europe/Berlin",
                "send the daily report",
            )
            assert job.next_run_at == "2026-01-01T08:00:00Z"
            assert any("job: schedule" in p["error"] for p in sync.health()), sync.health()
            vault.notes[note["id"]]["metadata"]["cron"] = "30 9 * * *"
            await trio.sleep(61)
            assert (await scheduler.get("report")).next_run_at == "2026-01-01T08:30:00Z"
            vault.notes[note["id"]]["metadata"]["enabled"] = "false"
            await trio.sleep(60)
            assert (await scheduler.get("report")).enabled is False
            del vault.notes[note["id"]]
            await trio.sleep(60)
            assert [j.name for j in await scheduler.jobs()] == []
            nursery.cancel_scope.cancel()


async def test_mcp_m17_a_notify_on_a_vault_channel_is_written_as_an_outbound_note(
    rig: Rig,
) -> None:
    """mcp.md M17: the notify is stored, and the outbox writes it to the vault once."""
    call = {"name": "notify", "arguments": {"content": "halfway there"}}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}
    opened = await rig.client.post("/mcp/worker", json={**init, "params": {"protocolVersion": "x"}})
    session = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}
    answer = (await rig.client.post("/mcp/worker", json=body, headers=session)).json()
    note_id = answer["result"]["structuredContent"]["id"]
    with trio.fail_after(10):
        while not rig.vault.tagged("#agent/message/outbound"):
            await trio.sleep(0.02)
    (note,) = rig.vault.tagged("#agent/message/outbound")
    assert note["content"] == "halfway there" and note["path"].startswith("channel/worker/")
    assert note["metadata"]["notify"] == "true" and note["metadata"]["direction"] == "outbound"
    stored = (await rig.client.get(f"/api/messages/{note_id}")).json()
    assert stored["metadata"] == {"notify": "true", "remote_id": note["id"]}
