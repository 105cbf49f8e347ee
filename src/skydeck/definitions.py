"""Agent definitions and jobs from a Parachute Vault (parachute-vault.md §4, §5, §8).

`VaultSync` lists the `#agent/definition` and `#agent/job` notes at start and
every `poll_s` seconds and converges the registry and the scheduler on them:
add, change, delete and rename (a renamed definition stops the old agent,
unlike upstream). An invalid note is skipped with one clear log line and shown
in `/health` with its error; a previously good version keeps running. Agents
and jobs created through the HTTP API are left alone: a name clash is
reported, never overwritten. `status` is written back to a definition note
only when it changes, never on every poll (upstream bug 5).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from . import validate
from .errors import (
    BadRequest,
    DeliveryError,
    InputError,
    InvalidNote,
    NotFound,
    StateError,
    StoreFailure,
)
from .model import AgentSpec, Job
from .registry import Registry
from .scheduler import Scheduler
from .transports.vault import TAG_DEFINITION, TAG_JOB, VaultClient, VaultMirror

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

DEF_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
MODEL = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._:-]*\Z")
LIST_LIMIT = 500
LEGACY_MODES = {
    "resident": "single-threaded",
    "one-shot": "multi-threaded",
    "per-thread": "multi-threaded",
}


def _text(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _json_field(metadata: dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise InvalidNote(f"{key} is not valid JSON") from None
    return value


def parse_definition(note: dict[str, Any]) -> AgentSpec:
    """A `#agent/definition` note -> an agent, or `InvalidNote` saying why."""
    metadata = note.get("metadata") if isinstance(note.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    name = _text(metadata, "name")
    if name is None or not DEF_NAME.match(name) or len(name) > 64:
        raise InvalidNote("name is required: letters, digits, '_' or '-'")
    backend = _text(metadata, "backend") or "programmatic"
    if backend in ("programmatic", "claude"):
        backend = "claude"
    elif backend not in ("command", "echo"):
        raise InvalidNote(f"backend {backend!r} is not supported (claude, command, echo)")
    mode = _text(metadata, "mode") or "single-threaded"
    mode = LEGACY_MODES.get(mode, mode)
    body: dict[str, Any] = {"name": name, "channel": name, "backend": backend, "mode": mode}
    model = _text(metadata, "model")
    if model is not None:
        if not MODEL.match(model):
            raise InvalidNote(f"model {model!r} is not a model name")
        body["model"] = model
    prompt = note.get("content")
    if isinstance(prompt, str) and prompt.strip():
        body["system_prompt"] = prompt
    if metadata.get("command") not in (None, ""):
        body["command"] = _json_field(metadata, "command")
    if metadata.get("env") not in (None, ""):
        body["env"] = _json_field(metadata, "env")
    if metadata.get("timeout_s") not in (None, ""):
        try:
            body["timeout_s"] = int(str(metadata["timeout_s"]))
        except ValueError:
            raise InvalidNote("timeout_s is not a whole number") from None
    if _text(metadata, "queue_mode"):
        body["queue_mode"] = _text(metadata, "queue_mode")
    if _text(metadata, "sandbox"):
        body["sandbox"] = _text(metadata, "sandbox")
    egress = metadata.get("egress")
    if egress not in (None, ""):
        # S2: an array, or one string of targets split by commas or spaces.
        body["egress"] = egress.replace(",", " ").split() if isinstance(egress, str) else egress
    if str(metadata.get("mcp", "")).strip().lower() == "false":  # mcp.md M26
        body["mcp"] = False
    if (allow := _text(metadata, "mcp_allow")) is not None:
        body["mcp_allow"] = allow.replace(",", " ").split()
    try:
        spec = validate.new_agent(body)
    except BadRequest as exc:
        raise InvalidNote(exc.message) from None
    return replace(spec, source=f"vault:{note['id']}")


def parse_job(note: dict[str, Any]) -> Job:
    """A `#agent/job` note -> a job (§5), or `InvalidNote`."""
    metadata = note.get("metadata") if isinstance(note.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    body = {
        "name": _text(metadata, "jobId") or note.get("id"),
        "channel": _text(metadata, "agent") or _text(metadata, "channel"),
        "schedule": _text(metadata, "cron"),
        "content": note.get("content"),
        "timezone": _text(metadata, "tz") or "UTC",
        "enabled": str(metadata.get("enabled", "true")).lower() not in ("false", "0", "no"),
    }
    try:
        job = validate.new_job(body)
    except BadRequest as exc:
        raise InvalidNote(exc.message) from None
    job.source = f"vault:{note['id']}"
    return job


class VaultSync:
    def __init__(
        self,
        client: VaultClient,
        registry: Registry,
        mirror: VaultMirror,
        scheduler: Scheduler | None,
        *,
        poll_s: float = 60.0,
    ) -> None:
        self.client = client
        self.registry = registry
        self.mirror = mirror
        self.scheduler = scheduler
        self.poll_s = poll_s
        self.problems: dict[str, dict[str, str]] = {}  # note id -> {note, name, error}
        self.syncs = 0
        for agent in registry.agents():  # vault agents stored by an earlier run
            if agent.source and agent.source.startswith("vault:"):
                self._mark_vault(agent)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sync_once()
        task_status.started()
        while True:
            await trio.sleep(self.poll_s)
            await self.sync_once()

    async def sync_once(self) -> None:
        self.syncs += 1
        # A failing store (a full disk) is like a failing vault: converge at the next poll.
        try:
            await self._sync_definitions()
        except (DeliveryError, StoreFailure) as exc:
            log.warning("definition poll failed; trying again later", extra={"error": str(exc)})
        if self.scheduler is not None:
            try:
                await self._sync_jobs(self.scheduler)
            except (DeliveryError, StoreFailure) as exc:
                log.warning("job poll failed; trying again later", extra={"error": str(exc)})

    def health(self) -> list[dict[str, str]]:
        return [self.problems[key] for key in sorted(self.problems)]

    # -- definitions --------------------------------------------------------------

    def _mark_vault(self, agent: AgentSpec) -> None:
        self.mirror.channels.add(agent.channel)
        assert agent.source is not None
        self.mirror.definitions[agent.name] = agent.source.removeprefix("vault:")

    def _vault_agents(self) -> dict[str, AgentSpec]:
        """note id -> the agent it defines, as currently registered."""
        return {
            agent.source.removeprefix("vault:"): agent
            for agent in self.registry.agents()
            if agent.source and agent.source.startswith("vault:")
        }

    async def _sync_definitions(self) -> None:
        notes = await self.client.list_notes(TAG_DEFINITION, limit=LIST_LIMIT)
        live = self._vault_agents()
        seen: set[str] = set()
        for note in notes:
            note_id = str(note.get("id", ""))
            seen.add(note_id)
            try:
                spec = parse_definition(note)
                await self._converge_agent(note_id, spec, live.get(note_id))
            except StoreFailure:
                raise  # ours, not the note's: no error stamp on it
            except (InputError, StateError) as exc:  # an invalid note, a name clash
                self._problem(note_id, note, exc.message)
                await self._stamp(note, "error")
                continue
            self.problems.pop(note_id, None)
            await self._stamp(note, "enabled")
        if len(notes) < LIST_LIMIT:  # a capped list is not proof that a note is gone
            for note_id, agent in live.items():
                if note_id not in seen:
                    log.info("definition deleted: agent removed", extra={"agent": agent.name})
                    await self._remove(agent)
                    self.problems.pop(note_id, None)

    async def _converge_agent(
        self, note_id: str, spec: AgentSpec, current: AgentSpec | None
    ) -> None:
        if current is not None and current.name != spec.name:
            log.info("definition renamed", extra={"old": current.name, "new": spec.name})
            await self._remove(current)  # upstream left the old agent running (bug 6)
            current = None
        try:
            existing = self.registry.get(spec.name)
        except NotFound:
            existing = None
        if existing is not None and existing.source != spec.source:
            raise InvalidNote(
                f"an agent named {spec.name!r} already exists (created outside this "
                "definition); rename one of them"
            )
        if existing is None:
            await self.registry.create(spec)
            log.info("definition loaded", extra={"agent": spec.name, "note": note_id})
        else:
            changes = {
                key: value
                for key, value in spec.to_json().items()
                if key != "created_at" and getattr(existing, key) != value
            }
            if changes:
                await self.registry.update(spec.name, changes)
                log.info(
                    "definition changed", extra={"agent": spec.name, "fields": ",".join(changes)}
                )
        self._mark_vault(self.registry.get(spec.name))

    async def _remove(self, agent: AgentSpec) -> None:
        await self.registry.remove(agent.name)
        self.mirror.channels.discard(agent.channel)
        self.mirror.definitions.pop(agent.name, None)

    def _problem(self, note_id: str, note: dict[str, Any], error: str) -> None:
        metadata = note.get("metadata") if isinstance(note.get("metadata"), dict) else {}
        name = str((metadata or {}).get("name", ""))
        if self.problems.get(note_id, {}).get("error") != error:
            log.warning(
                "invalid agent definition skipped",
                extra={"note": note_id, "definition": name, "error": error},
            )
        self.problems[note_id] = {"note": note_id, "name": name, "error": error}

    async def _stamp(self, note: dict[str, Any], status: str) -> None:
        """Write `status` back only when it changes (no churn, upstream bug 5)."""
        metadata = note.get("metadata") if isinstance(note.get("metadata"), dict) else {}
        if (metadata or {}).get("status") == status or "id" not in note:
            return
        try:
            await self.client.patch_note(
                str(note["id"]), {"metadata": {"status": status, "pending": ""}, "force": True}
            )
        except DeliveryError as exc:
            log.warning("definition status not written", extra={"error": str(exc)})

    # -- jobs ---------------------------------------------------------------------

    async def _sync_jobs(self, scheduler: Scheduler) -> None:
        notes = await self.client.list_notes(TAG_JOB, limit=LIST_LIMIT)
        live = {job.source: job for job in await scheduler.jobs() if job.source}
        seen: set[str] = set()
        for note in notes:
            try:
                job = parse_job(note)
            except InvalidNote as exc:
                self._problem(str(note.get("id", "")), note, f"job: {exc}")
                continue
            assert job.source is not None
            seen.add(job.source)
            self.problems.pop(str(note.get("id", "")), None)
            current = live.get(job.source)
            try:
                if current is None:
                    await scheduler.create(job)
                elif current.name != job.name:
                    await scheduler.remove(current.name)
                    await scheduler.create(job)
                else:
                    fields = ("channel", "schedule", "content", "timezone", "enabled")
                    changes = {
                        f: getattr(job, f) for f in fields if getattr(current, f) != getattr(job, f)
                    }
                    if changes:
                        await scheduler.update(job.name, changes)
            except StoreFailure:
                raise
            except (InputError, StateError) as exc:
                self._problem(str(note.get("id", "")), note, f"job: {exc.message}")
        if len(notes) < LIST_LIMIT:
            for source, job in live.items():
                if source not in seen:
                    await scheduler.remove(job.name)
