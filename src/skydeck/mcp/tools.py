"""The eight tools of ``/mcp/{channel}`` (mcp.md §3, M11-M23).

Each tool is a schema (sent verbatim in ``tools/list``; the model sees it as
is), a scope, and a handler. Arguments are checked here before anything runs,
first failure only, in the order M11 gives: an unknown field, a missing
required one, then each field's type and value, then what the tool itself
checks. A failure is a tool result with ``isError: true`` (the model reads it
and can try again), never a protocol error.

Tool calls run in HTTP request tasks beside the turn that made them, never in
a channel task (M30): no tool waits for another turn, so two agents calling
each other cannot deadlock. Every write is committed (`Store.flushed`) before
the tool answers (M13).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from croniter import CroniterBadDateError, croniter

from ..errors import BadRequest, Conflict, CursorError, NotFound, Unavailable
from ..events import TurnEvents
from ..model import AgentSpec, EventKind, Inbound, Job, Message, TurnEvent
from ..registry import Registry
from ..scheduler import Scheduler, iso
from ..store import Fence, Store
from ..turn import MAX_DELEGATION_DEPTH
from ..validate import json_integer
from ..validate import name as valid_name
from ..validate import timezone as valid_timezone
from .access import Caller
from .protocol import NO_STRUCTURED

log = logging.getLogger(__name__)

CHANNEL_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: M14: successful send_message, notify and schedule calls per turn token.
MAX_POSTS_PER_TURN = 100
#: M21: enabled jobs a channel may hold through `schedule`.
MAX_TOOL_JOBS = 20
MAX_DELAY_S = 31_536_000
MAX_AHEAD = timedelta(days=365)
#: M18: a longer message content is cut in `read_messages`.
READ_CONTENT_LIMIT = 8000
DEFAULT_READ_LIMIT = 20
MAX_READ_LIMIT = 100
MAX_CORRELATION_ID = 200

SHUTTING_DOWN = "skydeck is shutting down; try again after it restarts"


class ToolError(Exception):
    """A tool's refusal: the sentence the model reads, and the argument at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


# -- argument checks (one per field name; None means the field is absent) -------


def _r1(field: str) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        try:
            return valid_name(value, field)
        except BadRequest as exc:
            raise ToolError(exc.message, field) from None

    return check


def _non_empty(field: str) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        if not isinstance(value, str) or not value:
            raise ToolError(f"{field} is required and must be a non-empty string", field)
        return value

    return check


def _string(field: str) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        if not isinstance(value, str):
            raise ToolError(f"{field} must be a string", field)
        return value

    return check


def _bounded(field: str, low: int, high: int) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        number = json_integer(value)
        if number is None or not low <= number <= high:
            raise ToolError(f"{field} must be an integer from {low} to {high}", field)
        return number

    return check


def _callback(value: object) -> Any:
    if not isinstance(value, bool):
        raise ToolError("callback must be true or false", "callback")
    return value


def _correlation_id(value: object) -> Any:
    if not isinstance(value, str) or len(value) > MAX_CORRELATION_ID:
        raise ToolError(
            f"correlation_id must be a string of at most {MAX_CORRELATION_ID} characters",
            "correlation_id",
        )
    return value


CRON_TEXT = "cron must be a 5-field cron expression, e.g. '*/5 * * * *'"
AT_TEXT = "at must be an ISO 8601 time with an offset, e.g. 2026-12-24T18:00:00Z"


def _cron(value: object) -> Any:
    if not isinstance(value, str) or len(value.split()) != 5 or not croniter.is_valid(value):
        raise ToolError(CRON_TEXT, "cron")
    return " ".join(value.split())


def _timezone(value: object) -> Any:
    try:
        return valid_timezone(value)
    except BadRequest as exc:
        raise ToolError(exc.message, "timezone") from None


def parse_at(value: object) -> datetime | None:
    """An ISO 8601 time that names its offset (``Z`` or ``+01:00``), else None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _at(value: object) -> Any:
    moment = parse_at(value)
    if moment is None:
        raise ToolError(AT_TEXT, "at")
    return moment


CHECKS: dict[str, Callable[[object], Any]] = {
    "channel": _r1("channel"),
    "content": _non_empty("content"),
    "callback": _callback,
    "correlation_id": _correlation_id,
    "limit": _bounded("limit", 1, MAX_READ_LIMIT),
    "before": _string("before"),
    "after": _string("after"),
    "id": _non_empty("id"),
    "cron": _cron,
    "timezone": _timezone,
    "at": _at,
    "delay_s": _bounded("delay_s", 1, MAX_DELAY_S),
    "name": _r1("name"),
}


def _schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = False
    return schema


def check_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """M11: the arguments, checked and normalised, or `ToolError` for the first fault."""
    properties: dict[str, Any] = schema["properties"]
    unknown = [key for key in arguments if key not in properties]
    if unknown:
        raise ToolError(f"unknown field {unknown[0]!r}", unknown[0])
    for key in schema.get("required", ()):
        if key not in arguments:
            CHECKS[key](None)  # the field's own "is required" sentence
    return {key: CHECKS[key](arguments[key]) for key in properties if key in arguments}


# -- the tools ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    scope: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        }


_CHANNEL = {"type": "string", "pattern": CHANNEL_PATTERN}
_CONTENT = {"type": "string", "minLength": 1}

TOOLS: tuple[Tool, ...] = (
    Tool(
        "send_message",
        "Post a message to another agent's channel. That agent runs a turn on it. When that "
        "turn ends, a message starting with [callback] arrives on your own channel (unless "
        "callback is false); its metadata.source_message is the id of the agent's reply, "
        "which get_message reads. Returns at once; it does not wait.",
        _schema(
            {
                "channel": _CHANNEL,
                "content": _CONTENT,
                "callback": {"type": "boolean"},
                "correlation_id": {"type": "string", "maxLength": MAX_CORRELATION_ID},
            },
            ("channel", "content"),
        ),
        "agent:send",
    ),
    Tool(
        "notify",
        "Post a progress message on your own channel now, while you keep working; people "
        "watching the channel see it at once and it stays in the transcript. Your final "
        "answer is still your normal reply; do not repeat it here.",
        _schema({"content": _CONTENT}, ("content",)),
        "agent:send",
    ),
    Tool(
        "read_messages",
        "Read a channel's transcript, oldest first: by default the newest messages; page "
        "back with before = prev, forward with after = next.",
        _schema(
            {
                "channel": _CHANNEL,
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_READ_LIMIT},
                "before": {"type": "string"},
                "after": {"type": "string"},
            }
        ),
        "agent:read",
    ),
    Tool(
        "get_message",
        "Read one message in full by id; for a message that was answered, the reply comes with it.",
        _schema({"id": {"type": "string", "minLength": 1}}, ("id",)),
        "agent:read",
    ),
    Tool(
        "list_agents",
        "List skydeck's agents: name, channel, backend, mode, status, and whether "
        "send_message may reach them.",
        _schema({}),
        "agent:read",
    ),
    Tool(
        "schedule",
        "Schedule a message to your own channel: once (at, or delay_s from now) or "
        "repeatedly (cron, 5 fields, in timezone). Each time it fires you get a turn with "
        "content as the prompt.",
        _schema(
            {
                "content": _CONTENT,
                "cron": {"type": "string"},
                "timezone": {"type": "string"},
                "at": {"type": "string", "format": "date-time"},
                "delay_s": {"type": "integer", "minimum": 1, "maximum": MAX_DELAY_S},
                "name": _CHANNEL,
            },
            ("content",),
        ),
        "agent:write",
    ),
    Tool(
        "list_jobs",
        "List the jobs that post to your own channel.",
        _schema({}),
        "agent:read",
    ),
    Tool(
        "cancel_job",
        "Delete a job you made with schedule.",
        _schema({"name": _CHANNEL}, ("name",)),
        "agent:write",
    ),
)
BY_NAME: Mapping[str, Tool] = {tool.name: tool for tool in TOOLS}


def success(payload: dict[str, Any], version: str) -> dict[str, Any]:
    """M11: the object as compact JSON text, and as structured content (2025-06-18 on)."""
    body = {"ok": True, **payload}
    out: dict[str, Any] = {
        "content": [{"type": "text", "text": json.dumps(body, separators=(",", ":"))}]
    }
    if version != NO_STRUCTURED:
        out["structuredContent"] = body
    out["isError"] = False
    return out


def failure(error: ToolError, version: str) -> dict[str, Any]:
    body: dict[str, Any] = {"ok": False, "error": error.message}
    if error.field is not None:
        body["field"] = error.field
    out: dict[str, Any] = {"content": [{"type": "text", "text": error.message}]}
    if version != NO_STRUCTURED:
        out["structuredContent"] = body
    out["isError"] = True
    return out


def truncated(message: Message) -> dict[str, Any]:
    """M18: a transcript entry, its content cut at `READ_CONTENT_LIMIT` characters."""
    data = message.to_json()
    if len(message.content) > READ_CONTENT_LIMIT:
        data["content"] = message.content[:READ_CONTENT_LIMIT] + "…"
        data["truncated"] = True
    return data


@dataclass(frozen=True, slots=True)
class Invocation:
    """One tools/call: who calls, at which session version, with the CLI's tool-use id."""

    caller: Caller
    version: str
    tool_use_id: str | None = None

    @property
    def channel(self) -> str:
        return self.caller.channel

    @property
    def depth(self) -> int:
        """M16: D, the turn's depth; 0 for outside callers."""
        return self.caller.grant.depth if self.caller.grant is not None else 0


Handler = Callable[[Invocation, dict[str, Any]], Awaitable[dict[str, Any]]]


class Toolbox:
    """The tools' handlers over the daemon's parts."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        events: TurnEvents,
        scheduler: Scheduler | None,
        *,
        on_call: Callable[[str, str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.events = events
        self.scheduler = scheduler
        self.on_call = on_call
        self._handlers: dict[str, Handler] = {
            "send_message": self._send_message,
            "notify": self._notify,
            "read_messages": self._read_messages,
            "get_message": self._get_message,
            "list_agents": self._list_agents,
            "schedule": self._schedule,
            "list_jobs": self._list_jobs,
            "cancel_job": self._cancel_job,
        }

    async def call(self, tool: Tool, call: Invocation, arguments: dict[str, Any]) -> dict[str, Any]:
        """Run one tool: the M11 result, an INFO line and a counter (M27)."""
        started = time.monotonic()
        try:
            args = check_arguments(tool.input_schema, arguments)
            if tool.scope not in call.caller.scopes:
                raise ToolError(f"this token lacks the {tool.scope} scope")
            answer = success(await self._handlers[tool.name](call, args), call.version)
        except ToolError as error:
            answer = failure(error, call.version)
        outcome = "error" if answer["isError"] else "ok"
        log.info(
            "mcp tool call",
            extra={
                "channel": call.channel,
                "tool": tool.name,
                "outcome": outcome,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        if self.on_call is not None:
            self.on_call(tool.name, outcome)
        return answer

    # -- shared rules -------------------------------------------------------------

    def _serving(self, channel: str) -> AgentSpec | None:
        return next((a for a in self.registry.agents() if a.channel == channel), None)

    def may_reach(self, own: str, target: str) -> bool:
        """M12: another channel is in reach unless the caller's agent lists others."""
        if target == own:
            return True
        agent = self._serving(own)
        return agent is None or agent.mcp_allow is None or target in agent.mcp_allow

    @contextmanager
    def _post_slot(self, call: Invocation) -> Iterator[None]:
        """M14: a post takes its slot of the turn's 100 before its first await, so
        parallel calls cannot all pass the check; one that fails gives it back."""
        grant = call.caller.grant
        if grant is None:
            yield
            return
        if grant.posts >= MAX_POSTS_PER_TURN:
            raise ToolError(
                f"this turn has already posted {MAX_POSTS_PER_TURN} times through skydeck "
                "tools (the per-turn limit)"
            )
        grant.posts += 1
        try:
            yield
        except BaseException:
            grant.posts -= 1
            raise

    # -- the handlers -------------------------------------------------------------

    async def _send_message(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        own, target = call.channel, args["channel"]
        if target == own:
            raise ToolError(
                f"send_message cannot target your own channel {own!r}; use notify to post on it",
                "channel",
            )
        if self._serving(target) is None:
            raise ToolError(f"no agent serves channel {target!r}", "channel")
        if not self.may_reach(own, target):
            raise ToolError(f"channel {target!r} is not in this agent's mcp_allow list", "channel")
        depth = call.depth + 1
        if depth >= MAX_DELEGATION_DEPTH:
            raise ToolError(
                "delegation depth limit reached: a message sent from this turn would be at "
                f"depth {depth} (the limit is {MAX_DELEGATION_DEPTH - 1})"
            )
        with self._post_slot(call):
            if not self.registry.accepting:
                raise ToolError(SHUTTING_DOWN)
            callback = args.get("callback", True)
            metadata: dict[str, Any] = {}
            if callback:
                metadata["reply_to"] = own
            metadata["delegation_depth"] = depth
            if "correlation_id" in args:
                metadata["correlation_id"] = args["correlation_id"]
            metadata["sender_channel"] = own
            grant = call.caller.grant
            external_id = None
            if grant is not None:
                metadata["sender_thread"] = grant.thread_id
                if call.tool_use_id is not None:
                    external_id = f"mcp:{grant.thread_id}:{call.tool_use_id}"
            inbound = Inbound(
                channel=target, content=args["content"], external_id=external_id, metadata=metadata
            )
            try:
                accepted = await self.registry.submit(inbound)
            except Unavailable:
                raise ToolError(SHUTTING_DOWN) from None
            await self.store.flushed()
        return {
            "id": accepted.id,
            "state": accepted.state,
            "channel": target,
            "delegation_depth": depth,
            "callback": callback,
        }

    async def _notify(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        with self._post_slot(call):
            grant = call.caller.grant
            fence = grant.fence if grant is not None else Fence.local(call.channel)
            message = await self.store.add_outbound(
                call.channel,
                args["content"],
                fence,
                metadata={"notify": "true"},
                in_reply_to=grant.message_id if grant is not None else None,
                thread_id=grant.thread_id if grant is not None else None,
            )
            await self.store.flushed()
        event = TurnEvent(
            kind=EventKind.NOTIFY,
            message_id=grant.message_id if grant is not None else message.id,
            data={"id": message.id, "content": message.content},
        )
        try:
            self.events.publish(call.channel, event)
        except Exception:  # R25: a viewer's failure is never the caller's
            log.exception("notify event failed", extra={"channel": call.channel})
        mirror = self.registry.deps.mirror
        if mirror is not None and mirror.serves(call.channel):
            await mirror.queue_notify(message, fence)  # written there like a reply, from the outbox
            await self.store.flushed()
        return {"id": message.id, "channel": call.channel}

    async def _read_messages(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel", call.channel)
        after, before = args.get("after"), args.get("before")
        if after is not None and before is not None:
            raise ToolError("give after or before, not both", "before")
        if not self.may_reach(call.channel, channel):
            raise ToolError(f"channel {channel!r} is not in this agent's mcp_allow list", "channel")
        try:
            page = await self.store.list_messages(
                channel,
                limit=args.get("limit", DEFAULT_READ_LIMIT),
                after=after,
                before=before,
                tail=after is None and before is None,
            )
        except CursorError:
            raise ToolError(
                "cursor is not one this daemon handed out",
                "after" if after is not None else "before",
            ) from None
        return {
            "channel": channel,
            "messages": [truncated(message) for message in page.messages],
            "next": page.next,
            "prev": page.prev,
        }

    async def _get_message(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        message_id = args["id"]
        message = await self.store.get_message(message_id)
        if message is None or not self.may_reach(call.channel, message.channel):
            raise ToolError(f"no message with id {message_id!r} on a channel you may read", "id")
        reply = await self.store.get_message(message.reply_id) if message.reply_id else None
        return {
            "message": message.to_json(),
            "reply": reply.to_json() if reply is not None else None,
        }

    async def _list_agents(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        own = call.channel
        await self.registry.refresh_status()  # P24: channels run on another host
        agents = []
        for agent in self.registry.agents():
            status, queued = self.registry.status(agent.name)
            agents.append(
                {
                    "name": agent.name,
                    "channel": agent.channel,
                    "backend": agent.backend,
                    "mode": agent.mode,
                    "status": status,
                    "queued": queued,
                    "self": agent.channel == own,
                    "reachable": agent.channel != own and self.may_reach(own, agent.channel),
                }
            )
        return {"agents": agents}

    def _jobs(self) -> Scheduler:
        if self.scheduler is None:
            raise ToolError("this daemon runs no scheduler")
        return self.scheduler

    async def _schedule(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        jobs = self._jobs()
        own = call.channel
        given = [key for key in ("cron", "at", "delay_s") if key in args]
        if len(given) != 1:
            raise ToolError("give exactly one of cron, at and delay_s", "cron")
        now = jobs.clock.now()
        run_at: str | None = None
        if "cron" in args:
            zone = args.get("timezone", "UTC")
            try:
                croniter(args["cron"], now).get_next(datetime)
            except CroniterBadDateError:
                raise ToolError("cron never fires (no such date)", "cron") from None
        else:
            if "timezone" in args:
                raise ToolError("timezone is only used with cron", "timezone")
            zone = "UTC"
            if "at" in args:
                moment: datetime = args["at"]
                if not now < moment <= now + MAX_AHEAD:
                    raise ToolError("at must be in the future and at most 365 days ahead", "at")
            else:
                moment = now + timedelta(seconds=args["delay_s"])
            run_at = iso(moment)
        name = args.get("name") or f"{own}-{secrets.token_hex(4)}"
        source = f"mcp:{own}"
        existing = await jobs.jobs()
        if any(job.name == name for job in existing):
            raise ToolError(f"a job named {name!r} already exists", "name")
        made = [job for job in existing if job.source == source and job.enabled]
        if len(made) >= MAX_TOOL_JOBS:
            raise ToolError(
                f"this channel already has {MAX_TOOL_JOBS} enabled jobs made through skydeck "
                "tools; cancel one first"
            )
        with self._post_slot(call):
            job = Job(
                name=name,
                channel=own,
                schedule=args.get("cron"),
                content=args["content"],
                timezone=zone,
                run_at=run_at,
                source=source,
                delegation_depth=call.depth,
            )
            try:
                created = await jobs.create(job)
            except Conflict as exc:  # made by someone else since `existing` was read
                raise ToolError(exc.message, "name") from None
            await self.store.flushed()
        return {"job": created.to_json()}

    async def _list_jobs(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        source = f"mcp:{call.channel}"
        return {
            "jobs": [
                {**job.to_json(), "cancellable": job.source == source}
                for job in await self._jobs().jobs()
                if job.channel == call.channel
            ]
        }

    async def _cancel_job(self, call: Invocation, args: dict[str, Any]) -> dict[str, Any]:
        jobs, name = self._jobs(), args["name"]
        try:
            job = await jobs.get(name)
        except NotFound:
            job = None
        if job is None or job.channel != call.channel:
            raise ToolError(f"no job named {name!r} on this channel", "name")
        if job.source != f"mcp:{call.channel}":
            raise ToolError(
                f"job {name!r} was not made through skydeck tools from this channel, "
                "so it cannot be cancelled here",
                "name",
            )
        await jobs.remove(name)
        await self.store.flushed()
        return {"name": name}
