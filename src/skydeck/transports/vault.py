"""Parachute Vault: an httpx client, and the mirror that writes a vault
channel's replies, thread notes and callbacks as notes (parachute-vault.md §1,
§3, §8), with the exact tags, paths and metadata keys parachute tools expect.

The local store stays the system of record. A reply the vault would not take
after the R20 retries (a transient failure) goes into the store's outbox, and
`VaultMirror.run_outbox` keeps delivering it, with backoff, once the vault is
back; callbacks for vault senders go through the same outbox, so a vault
outage loses nothing.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx
import trio

from ..errors import DeliveryError, StoreFailure
from ..ledger import MessageState, ThreadStatus, thread_moved
from ..model import AgentSpec, Inbound, Message, ThreadRecord, utc_now
from ..store import Fence, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

TAG_MESSAGE = "#agent/message"
TAG_INBOUND = "#agent/message/inbound"
TAG_OUTBOUND = "#agent/message/outbound"
TAG_THREAD = "#agent/thread"
TAG_DEFINITION = "#agent/definition"
TAG_JOB = "#agent/job"
OUTBOX_BACKOFF_MAX_S = 300.0
#: The outbox writes records of many channels, after their turns ended: it holds
#: a role of its own rather than any channel (multi-host.md §7).
OUTBOX_FENCE = Fence("role:vault-outbox")


def safe(value: str) -> str:
    """§3: every character outside [A-Za-z0-9_-] becomes '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", value)


def thread_path(agent: str, mode: str, thread_id: str) -> str:
    leaf = safe(agent) if mode == "single-threaded" else thread_id
    return f"Threads/{safe(agent)}/{leaf}"


class VaultClient:
    """The vault's note API. Every failure is a `DeliveryError` carrying the HTTP
    status (none for a network error or timeout), which decides retries (R20)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base = url.rstrip("/")
        if "/vault/" not in base:
            base += "/vault/default"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base
        self.http = httpx.AsyncClient(
            base_url=f"{base}/api", headers=headers, timeout=timeout_s, transport=transport
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"vault unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise DeliveryError(f"vault {method} {path} failed", status=response.status_code)
        return response

    @staticmethod
    def _note(body: Any) -> dict[str, Any]:
        if isinstance(body, list) and len(body) == 1:
            body = body[0]
        if isinstance(body, dict) and isinstance(body.get("note"), dict):
            body = body["note"]
        return body if isinstance(body, dict) else {}

    async def create_note(
        self, *, content: str, path: str, tags: list[str], metadata: dict[str, str]
    ) -> dict[str, Any]:
        body = {"content": content, "path": path, "tags": tags, "metadata": metadata}
        return self._note((await self._call("POST", "/notes", json=body)).json())

    async def get_note(self, ref: str) -> dict[str, Any] | None:
        try:
            response = await self._call(
                "GET", f"/notes/{quote(ref, safe='')}", params={"include_content": "true"}
            )
        except DeliveryError as exc:
            if exc.status == 404:
                return None
            raise
        return self._note(response.json())

    async def patch_note(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._call("PATCH", f"/notes/{quote(ref, safe='')}", json=body)
        return self._note(response.json())

    async def list_notes(self, tag: str, *, limit: int = 500) -> list[dict[str, Any]]:
        params = {"tag": tag, "include_content": "true", "limit": str(limit)}
        body = (await self._call("GET", "/notes", params=params)).json()
        if isinstance(body, dict) and isinstance(body.get("notes"), list):
            body = body["notes"]
        if not isinstance(body, list):
            raise DeliveryError("vault answered a note list that is not a list")
        return [note for note in body if isinstance(note, dict)]


class VaultMirror:
    """The `Mirror` for channels whose agent comes from a vault definition."""

    def __init__(self, client: VaultClient, store: Store) -> None:
        self.client = client
        self.store = store
        self.channels: set[str] = set()
        self.definitions: dict[str, str] = {}  # agent name -> definition note id
        self._wake = trio.Event()
        self._outbox_fence = OUTBOX_FENCE

    def serves(self, channel: str) -> bool:
        return channel in self.channels

    def wake(self) -> None:
        """Look at the outbox now (on several hosts other hosts add to it, P17)."""
        self._wake.set()

    def takes_callbacks(self, channel: str) -> bool:
        return channel in self.channels

    # -- replies ------------------------------------------------------------------

    async def write_reply(self, reply: Message, inbound: Message | None) -> str:
        """An outbound note: a reply, or a `notify` (its metadata says ``notify``)."""
        metadata = {
            "agent": reply.channel,
            "direction": "outbound",
            "sender": "session",
            "ts": reply.created_at,
            **({"notify": "true"} if reply.metadata.get("notify") == "true" else {}),
        }
        if inbound is not None:
            metadata["in_reply_to"] = inbound.external_id or inbound.id
        if reply.thread_id:
            metadata["thread"] = reply.thread_id
        proposed = str(uuid.uuid4())
        note = await self.client.create_note(
            content=reply.content,
            path=f"channel/{safe(reply.channel)}/{proposed}",
            tags=[TAG_MESSAGE, TAG_OUTBOUND],
            metadata=metadata,
        )
        note_id = note.get("id")
        # §1: the id comes from the answer; a vault that returns none leaves the path's uuid.
        return note_id if isinstance(note_id, str) and note_id else proposed

    # -- thread notes -------------------------------------------------------------

    async def write_thread(
        self, thread: ThreadRecord, phase: Literal["start", "end"], inbound: Message
    ) -> None:
        """§3 thread note: one upserted note per single-threaded agent, one per
        turn for multi-threaded. Counts and the session come from the local
        store (the system of record); the note mirrors them."""
        session = thread.session or await self.store.get_session(thread.agent) or ""
        now = utc_now()
        metadata = {
            "agent": thread.agent,
            "mode": thread.mode,
            "status": thread.status,
            "started_at": thread.started_at,
            "turn_count": str(thread.turn_count),
            "session": session,
        }
        if thread.agent in self.definitions:
            metadata["definition"] = self.definitions[thread.agent]
        if phase == "end":
            metadata["last_turn_at"] = thread.ended_at or now
        usage = thread.usage or {}
        for key in ("input_tokens", "output_tokens"):
            if usage.get(key):
                metadata[key] = str(usage[key])
        if usage.get("cost_usd"):
            metadata["total_cost_usd"] = f"{float(usage['cost_usd']):.9f}".rstrip("0")
        if phase == "start":
            summary = f"{thread.mode} thread for {thread.agent} — working, awaiting reply."
            latest = "**Status:** working — awaiting reply."
        else:
            summary = (
                f"{thread.mode} thread for {thread.agent} — {thread.turn_count} turns, "
                f"last {thread.status} at {metadata['last_turn_at']}."
            )
            label = "Reply" if thread.status == "ok" else "Error"
            latest = f"**{label}:** {thread.output}"
        content = (
            f"## Summary\n{summary}\n\n## Latest turn\n**Input:** {thread.input}\n\n{latest}\n"
        )
        path = thread_path(thread.agent, thread.mode, thread.id)
        await self.client.patch_note(
            path,
            {
                "content": content,
                "path": path,
                "tags": [TAG_THREAD],
                "metadata": metadata,
                "if_missing": "create",
                "force": True,
            },
        )

    async def read_session(self, agent: AgentSpec) -> str | None:
        note = await self.client.get_note(thread_path(agent.name, agent.mode, ""))
        session = (note or {}).get("metadata", {}).get("session")
        return session if isinstance(session, str) and session else None

    # -- the outbox ---------------------------------------------------------------

    async def queue_callback(self, callback: Inbound, fence: Fence) -> None:
        payload = {
            "channel": callback.channel,
            "content": callback.content,
            "metadata": callback.metadata,
        }
        await self.store.outbox_add("callback", payload, fence)
        self._wake.set()

    async def defer_reply(self, reply: Message, thread: ThreadRecord, fence: Fence) -> None:
        payload = {"message_id": reply.id, "thread_id": thread.id}
        await self.store.outbox_add("reply", payload, fence)
        self._wake.set()

    async def queue_notify(self, message: Message, fence: Fence) -> None:
        await self.store.outbox_add("notify", {"message_id": message.id}, fence)
        self._wake.set()

    async def clear_session(self, agent: AgentSpec) -> None:
        """R27 for a vault agent: the thread note's session is cleared too."""
        payload = {"agent": agent.name, "mode": agent.mode}
        await self.store.outbox_add("clear_session", payload, None)  # R27: no turn
        self._wake.set()

    async def run_outbox(
        self,
        fence: Fence = OUTBOX_FENCE,
        *,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver what could not be delivered, oldest first, with backoff, under
        ``fence`` (on several hosts the lease of `role:vault-outbox`, P17)."""
        self._outbox_fence = fence
        task_status.started()
        backoff = 1.0
        while True:
            self._wake = trio.Event()
            try:
                failed = await self._deliver_all()
            except StoreFailure as exc:
                # The store is failing: the items are still there (or back, if their
                # removal was lost) and go again after the backoff, at least once.
                log.warning("outbox paused: the store failed", extra={"reason": exc.reason})
                failed = True
            if failed:
                with trio.move_on_after(backoff):
                    await trio.sleep_forever()
                backoff = min(backoff * 2, OUTBOX_BACKOFF_MAX_S)
            else:
                backoff = 1.0
                await self._wake.wait()

    async def _deliver_all(self) -> bool:
        """Deliver the outbox in order; True if it stopped at a transient failure."""
        for seq, kind, payload, _attempts in await self.store.outbox_items():
            try:
                await self._deliver(kind, payload)
            except StoreFailure:
                raise
            except DeliveryError as exc:
                await self.store.outbox_failed(seq, str(exc), self._outbox_fence)
                if exc.transient:
                    await self.store.flushed()
                    return True  # the vault is down: keep the order, wait, try again
                log.error("vault refused an outbox item; dropped", extra={"kind": kind})
                await self.store.outbox_done(seq, self._outbox_fence)
                continue
            except Exception:  # a bug in one item never stops the outbox or the daemon
                log.exception("outbox item failed; dropped", extra={"kind": kind})
                await self.store.outbox_done(seq, self._outbox_fence)
                continue
            await self.store.outbox_done(seq, self._outbox_fence)
        await self.store.flushed()
        return False

    async def _deliver(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "callback":
            await self._write_callback(payload)
        elif kind == "reply":
            await self._redeliver_reply(payload)
        elif kind == "notify":
            await self._write_notify(payload)
        elif kind == "clear_session":
            path = thread_path(payload["agent"], payload["mode"], "")
            try:
                await self.client.patch_note(path, {"metadata": {"session": ""}, "force": True})
            except DeliveryError as exc:
                if exc.status != 404:  # no thread note yet: nothing to clear
                    raise

    async def _write_callback(self, payload: dict[str, Any]) -> None:
        channel = payload["channel"]
        metadata = {
            "agent": channel,
            "direction": "inbound",
            "sender": f"callback:{payload['metadata'].get('source_channel', '')}",
            "ts": utc_now(),
            **{key: str(value) for key, value in payload["metadata"].items()},
        }
        await self.client.create_note(
            content=payload["content"],
            path=f"channel/{safe(channel)}/{uuid.uuid4()}",
            tags=[TAG_MESSAGE, TAG_INBOUND],
            metadata=metadata,
        )

    async def _write_notify(self, payload: dict[str, Any]) -> None:
        """mcp.md M17: a notify as an outbound note, once (an item whose removal was
        lost comes again, and finds the note's id already kept)."""
        message = await self.store.get_message(payload["message_id"])
        if message is None or "remote_id" in message.metadata:
            return
        inbound = await self.store.get_message(message.in_reply_to) if message.in_reply_to else None
        remote_id = await self.write_reply(message, inbound)
        await self.store.set_remote_id(message, remote_id, self._outbox_fence)

    async def _redeliver_reply(self, payload: dict[str, Any]) -> None:
        """A reply that failed R20 lands at last: same turn, records back to ok,
        no second callback (parachute-vault.md §8)."""
        reply = await self.store.get_message(payload["message_id"])
        thread = await self.store.get_thread(payload["thread_id"])
        if reply is None or thread is None or reply.in_reply_to is None:
            return
        inbound = await self.store.get_message(reply.in_reply_to)
        if inbound is None:
            return
        # At least once: an item whose removal was lost (a crash, a full disk)
        # comes again. Only what is not delivered yet is delivered and moved.
        if "remote_id" not in reply.metadata:
            remote_id = await self.write_reply(reply, inbound)
            await self.store.set_remote_id(reply, remote_id, self._outbox_fence)
        undone = [
            m
            for m in await self.store.answered_by(reply.id)
            if m.state in (MessageState.FAILED, MessageState.WORKING)
        ]
        await self.store.set_state(undone, MessageState.DONE, self._outbox_fence)
        # A single-threaded conversation's record may show a later turn by now:
        # only a record still showing this turn (and not ok yet) is flipped back to ok.
        if thread.message_id == inbound.id and thread.status is ThreadStatus.ERROR:
            thread = thread_moved(thread, ThreadStatus.OK, output=reply.content)
            await self.store.rewrite_thread(thread, self._outbox_fence)
            try:
                await self.write_thread(thread, "end", inbound)
            except DeliveryError as exc:
                log.warning("thread note not updated after redelivery", extra={"error": str(exc)})
        log.info("undelivered reply delivered from the outbox", extra={"channel": reply.channel})

    async def pending(self) -> int:
        return await self.store.outbox_count()
