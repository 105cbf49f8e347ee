"""Request bodies -> records, or a `BadRequest` naming the field at fault.

Pure functions with no I/O, so every rule is cheap to test exhaustively (and to
fuzz): the HTTP layer only reads bytes and calls these.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .errors import BadRequest
from .model import (
    BACKENDS,
    DEFAULT_TIMEOUT_S,
    MODES,
    QUEUE_MODES,
    SANDBOX_MODES,
    AgentSpec,
    Inbound,
    Job,
    is_valid_name,
)
from .sandbox.modes import EGRESS_NEEDS_WORKSPACE, MAX_EGRESS, parse_target

OUTBOUND_TAGS = frozenset({"#agent/message/outbound", "agent/message/outbound"})
MAX_TIMEOUT_S = 86_400
#: ``max_reply_bytes``: room for the cut marker at the low end; the top keeps a
#: reply small enough to store, page and render without stalling anything.
MIN_REPLY_BYTES = 1000
MAX_REPLY_BYTES = 64 * 1024 * 1024

_PLAIN_FIELDS = frozenset(
    {"channel", "content", "id", "reply_to", "correlation_id", "delegation_depth", "metadata"}
)


#: Integers a body may hold: what SQLite and every JSON parser with int64 keep exactly.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Python's own ceiling for int <-> str (sys.get_int_max_str_digits), applied to every number.
MAX_NUMBER_DIGITS = 4300
#: A JSON escape of a UTF-16 surrogate: the only way a lone one can get into a parsed string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class _Unrepresentable:
    """Stands in for a number that has no strict RFC 8259 meaning here."""

    why: str


def _parse_int(text: str) -> int | _Unrepresentable:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        return _Unrepresentable(f"has more than {MAX_NUMBER_DIGITS} digits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        return _Unrepresentable("is an integer outside the signed 64-bit range")
    return value


def _parse_float(text: str) -> float | _Unrepresentable:
    if sum(c.isdigit() for c in text) > MAX_NUMBER_DIGITS:
        return _Unrepresentable(f"has more than {MAX_NUMBER_DIGITS} digits")
    value = float(text)
    if not math.isfinite(value):
        return _Unrepresentable("is a number too large to represent")
    return value


def _parse_constant(text: str) -> _Unrepresentable:
    return _Unrepresentable(f"is {text}, which is not JSON (RFC 8259 has no NaN or Infinity)")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _field_path(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    # A key with a lone surrogate must not break the error body that names it.
    return out.encode("utf-8", "backslashreplace").decode("utf-8") or "body"


def _find_unrepresentable(value: Any) -> tuple[str, str] | None:
    """The first value (depth first) that strict JSON cannot carry: (field, why)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Unrepresentable):
            return _field_path(path), item.why
        if isinstance(item, str) and _has_lone_surrogate(item):
            return _field_path(path), "holds a lone UTF-16 surrogate (not valid Unicode)"
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                if _has_lone_surrogate(key):
                    return _field_path([*path, key]), "is a key with a lone UTF-16 surrogate"
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in reversed(list(enumerate(item))))
    return None


def json_value(raw: bytes) -> Any:
    """Parse strict RFC 8259 JSON: no NaN/Infinity, numbers that round-trip, valid Unicode.

    Python's `json` accepts ``NaN`` and ``1e999`` and lone ``\\ud800`` escapes;
    stored, they would make every later transcript page invalid JSON for a
    browser. Numbers are checked by the parser's hooks; strings only when the
    raw bytes hold a surrogate escape at all (one C-speed regex scan).
    """
    flagged = False

    def flag(result: Any) -> Any:
        nonlocal flagged
        flagged = flagged or isinstance(result, _Unrepresentable)
        return result

    try:
        value = json.loads(
            raw,
            parse_int=lambda text: flag(_parse_int(text)),
            parse_float=lambda text: flag(_parse_float(text)),
            parse_constant=lambda text: flag(_parse_constant(text)),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if flagged or _SURROGATE_ESCAPE.search(raw):
        found = _find_unrepresentable(value)
        if found is not None:
            field, why = found
            raise BadRequest(f"{field} {why}", field=field)
    return value


def json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be one strict JSON object."""
    value = json_value(raw)
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def name(value: object, field: str) -> str:
    """R1 for agent names, channels and job names."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field} is required and must be a non-empty string", field=field)
    if not is_valid_name(value):
        raise BadRequest(
            f"{field} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=field,
        )
    return value


def _optional_str(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", field=field)
    return value


def json_integer(value: object) -> int | None:
    """A JSON integer. RFC 8259 has one number type, so ``5.0`` is 5 (as JSON Schema
    says too: a client whose numbers are all doubles sends what it means)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _depth(value: object) -> int:
    """R23, plain JSON body: a non-negative integer or a numeric string."""
    whole = json_integer(value)
    if whole is not None and whole >= 0:
        return whole
    # int() refuses more digits than MAX_NUMBER_DIGITS (a ValueError, not a BadRequest).
    if (
        isinstance(value, str)
        and value.isascii()
        and value.isdigit()
        and len(value) <= MAX_NUMBER_DIGITS
    ):
        return int(value)
    raise BadRequest("delegation_depth must be a non-negative integer", field="delegation_depth")


#: `POST /api/inbound/batch`: at most this many messages (and the 1 MiB body limit).
MAX_BATCH = 1000


def batch(body: dict[str, Any]) -> list[object]:
    """The batch body's ``messages``: a non-empty list of at most `MAX_BATCH` items
    (each is then checked on its own, so one bad item fails only itself)."""
    unknown = sorted(set(body) - {"messages"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_BATCH:
        raise BadRequest(
            f"messages must be a list of 1 to {MAX_BATCH} inbound bodies", field="messages"
        )
    return messages


def batch_item(item: object) -> Inbound:
    """One message of a batch: a plain inbound body (a vault trigger is not one)."""
    if not isinstance(item, dict):
        raise BadRequest("each message must be a JSON object")
    if "note" in item:
        raise BadRequest(
            "unknown field 'note' (vault triggers go to /api/vault/inbound)", field="note"
        )
    parsed = inbound(item)
    assert parsed is not None  # only a vault note is ever ignored
    return parsed


def inbound(body: dict[str, Any], *, channel: str | None = None) -> Inbound | None:
    """A webhook body (plain or Parachute Vault trigger) as an `Inbound`.

    ``channel`` is the path's channel for ``/api/channels/{ch}/messages``.
    Returns None for a vault note that is itself a reply (tagged outbound): it
    must be acknowledged and ignored, or replies would loop back as prompts.
    """
    if channel is None and "note" in body:
        return _vault_trigger(body)
    unknown = sorted(set(body) - _PLAIN_FIELDS - ({"channel"} if channel is None else set()))
    if channel is not None and "channel" in body:
        unknown.append("channel")
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    target = name(body.get("channel") if channel is None else channel, "channel")
    content = body.get("content")
    if not isinstance(content, str) or not content:
        raise BadRequest("content is required and must be a non-empty string", field="content")
    external_id = _optional_str(body, "id")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be a JSON object", field="metadata")
    metadata = dict(metadata)
    _refuse_reserved(metadata)
    if body.get("reply_to") is not None:
        metadata["reply_to"] = name(body["reply_to"], "reply_to")
    correlation_id = _optional_str(body, "correlation_id")
    if correlation_id is not None:
        metadata["correlation_id"] = correlation_id
    if body.get("delegation_depth") is not None:
        raw = body["delegation_depth"]
        depth = _depth(raw)
        # A numeric string is kept as received; a number as the integer it is (3.0 -> 3).
        metadata["delegation_depth"] = raw if isinstance(raw, str) else depth
    return Inbound(channel=target, content=content, external_id=external_id, metadata=metadata)


def _refuse_reserved(metadata: dict[str, Any]) -> None:
    """Only the Telegram receiver marks a message as Telegram's: replies are routed
    to a chat by these keys (T25), so a client must not be able to set them."""
    for key, value in metadata.items():
        if key.startswith("telegram_") or (key == "source" and value == "telegram"):
            raise BadRequest(
                f"metadata key {key!r} is reserved for the Telegram transport",
                field=f"metadata.{key}",
            )


def _vault_trigger(body: dict[str, Any]) -> Inbound | None:
    note = body["note"]
    if not isinstance(note, dict):
        raise BadRequest("note must be a JSON object", field="note")
    metadata = note.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadRequest("note.metadata must be a JSON object", field="note.metadata")
    tags = note.get("tags", [])
    if not isinstance(tags, list):
        raise BadRequest("note.tags must be a list", field="note.tags")
    if OUTBOUND_TAGS.intersection(t for t in tags if isinstance(t, str)) or (
        metadata.get("direction") == "outbound"
    ):
        return None
    note_id = note.get("id")
    if not isinstance(note_id, str) or not note_id:
        raise BadRequest("note.id is required and must be a string", field="note.id")
    agent = metadata.get("agent")
    routing = agent if isinstance(agent, str) and agent else metadata.get("channel")
    if routing is None or routing == "":
        raise BadRequest(
            "note.metadata.agent (or note.metadata.channel) is required", field="channel"
        )
    target = name(routing, "channel")
    content = note.get("content")
    if not isinstance(content, str) or not content:
        raise BadRequest("note.content must be a non-empty string", field="content")
    kept = {key: value for key, value in metadata.items() if isinstance(key, str)}
    if kept.get("reply_to") not in (None, ""):
        kept["reply_to"] = name(kept["reply_to"], "reply_to")
    else:
        kept.pop("reply_to", None)
    return Inbound(channel=target, content=content, external_id=note_id, metadata=kept)


# -- agents ---------------------------------------------------------------------

_AGENT_FIELDS = frozenset(
    {
        "name",
        "channel",
        "backend",
        "mode",
        "queue_mode",
        "model",
        "system_prompt",
        "command",
        "env",
        "timeout_s",
        "max_reply_bytes",
        "sandbox",
        "egress",
        "mcp",
        "mcp_allow",
    }
)
#: mcp.md M26: the most channels an agent's ``mcp_allow`` lists.
MAX_MCP_ALLOW = 100


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BadRequest(f"{field} must be one of: {', '.join(choices)}", field=field)
    assert isinstance(value, str)
    return value


def _known_fields(
    body: dict[str, Any], allowed: frozenset[str], *, partial: bool
) -> dict[str, Any]:
    """Reject unknown fields; parse the `name` and `channel` every resource has (R1)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", field=unknown[0])
    out: dict[str, Any] = {}
    for field in ("name", "channel"):
        if field in body or not partial:
            out[field] = name(body.get(field), field)
    return out


def _unrenamed(changes: dict[str, Any], current_name: str, what: str) -> dict[str, Any]:
    """A PATCH may repeat the name but not change it: it is the identity."""
    if "name" in changes and changes["name"] != current_name:
        raise BadRequest(f"name cannot be changed; create a new {what} instead", field="name")
    changes.pop("name", None)
    return changes


def _agent_fields(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    out = _known_fields(body, _AGENT_FIELDS, partial=partial)
    if "backend" in body:
        out["backend"] = _choice(body["backend"], "backend", BACKENDS)
    if "mode" in body:
        out["mode"] = _choice(body["mode"], "mode", MODES)
    if "queue_mode" in body:
        out["queue_mode"] = _choice(body["queue_mode"], "queue_mode", QUEUE_MODES)
    for field in ("model", "system_prompt"):
        if field in body:
            out[field] = _optional_str(body, field)
    if "command" in body:
        command = body["command"]
        if command is not None and (
            not isinstance(command, list)
            or not command
            or not all(isinstance(arg, str) for arg in command)
            or not command[0]
        ):
            raise BadRequest("command must be a non-empty list of strings", field="command")
        out["command"] = command
    if "env" in body:
        env = body["env"]
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise BadRequest("env must be an object of string values", field="env")
        out["env"] = env
    if "timeout_s" in body:
        timeout = json_integer(body["timeout_s"])
        if timeout is None or not 1 <= timeout <= MAX_TIMEOUT_S:
            raise BadRequest(
                f"timeout_s must be an integer from 1 to {MAX_TIMEOUT_S}", field="timeout_s"
            )
        out["timeout_s"] = timeout
    if "max_reply_bytes" in body:
        cap = json_integer(body["max_reply_bytes"])
        if cap is None or not MIN_REPLY_BYTES <= cap <= MAX_REPLY_BYTES:
            raise BadRequest(
                f"max_reply_bytes must be an integer from {MIN_REPLY_BYTES} to {MAX_REPLY_BYTES}",
                field="max_reply_bytes",
            )
        out["max_reply_bytes"] = cap
    if "sandbox" in body:
        if body["sandbox"] is not None and body["sandbox"] not in SANDBOX_MODES:
            raise BadRequest(
                f"sandbox must be one of: {', '.join(SANDBOX_MODES)} (or null)", field="sandbox"
            )
        out["sandbox"] = body["sandbox"]
    if "egress" in body:
        out["egress"] = egress(body["egress"])
    if "mcp" in body:
        if not isinstance(body["mcp"], bool):
            raise BadRequest("mcp must be true or false", field="mcp")
        out["mcp"] = body["mcp"]
    if "mcp_allow" in body:
        allow = body["mcp_allow"]
        if allow is not None and (
            not isinstance(allow, list)
            or len(allow) > MAX_MCP_ALLOW
            or not all(isinstance(ch, str) and is_valid_name(ch) for ch in allow)
        ):
            raise BadRequest(
                f"mcp_allow must be null or a list of at most {MAX_MCP_ALLOW} channel names",
                field="mcp_allow",
            )
        out["mcp_allow"] = allow
    return out


def egress(value: object) -> list[str]:
    """S2: at most `MAX_EGRESS` ``host:port`` strings (a bare host is ``host:443``)."""
    if not isinstance(value, list) or len(value) > MAX_EGRESS:
        raise BadRequest(
            f'egress must be a list of at most {MAX_EGRESS} "host:port" strings', field="egress"
        )
    targets: list[str] = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            target = parse_target(item)
        except ValueError:
            raise BadRequest(
                f"egress[{index}] must be host:port (a DNS name, IPv4 or [IPv6]; "
                "no scheme, path or wildcard)",
                field=f"egress[{index}]",
            ) from None
        if target not in targets:
            targets.append(target)
    return targets


def _check_command(spec: AgentSpec) -> None:
    if spec.backend == "command" and not spec.command:
        raise BadRequest("command is required for the command backend", field="command")
    if spec.egress and spec.sandbox not in (None, "workspace"):
        raise BadRequest(EGRESS_NEEDS_WORKSPACE, field="egress")


def new_agent(body: dict[str, Any]) -> AgentSpec:
    fields = _agent_fields(body, partial=False)
    fields.setdefault("timeout_s", DEFAULT_TIMEOUT_S)
    spec = AgentSpec(**fields)
    _check_command(spec)
    return spec


def agent_changes(body: dict[str, Any], current: AgentSpec) -> dict[str, Any]:
    """A PATCH body. Renaming is not a change an agent can take (its identity)."""
    changes = _unrenamed(_agent_fields(body, partial=True), current.name, "agent")
    merged = AgentSpec(**{**current.to_json(), **changes})
    _check_command(merged)
    return changes


# -- jobs -----------------------------------------------------------------------

_JOB_FIELDS = frozenset({"name", "channel", "schedule", "run_at", "content", "timezone", "enabled"})
RUN_AT_TEXT = "run_at must be an ISO 8601 time with an offset, e.g. 2026-12-24T18:00:00Z"


def run_at(value: object) -> str:
    """A one-shot's time (mcp.md M28): ISO 8601 naming its offset, stored as UTC."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            try:
                utc = moment.astimezone(UTC)
            except OverflowError:  # 9999-12-31T23:59-01:00 is past datetime's range in UTC
                raise BadRequest(RUN_AT_TEXT, field="run_at") from None
            return utc.isoformat(timespec="seconds").replace("+00:00", "Z")
    raise BadRequest(RUN_AT_TEXT, field="run_at")


def _job_fields(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    out = _known_fields(body, _JOB_FIELDS, partial=partial)
    if not partial and ("schedule" in body) == ("run_at" in body):
        raise BadRequest("give exactly one of schedule and run_at", field="schedule")
    if "run_at" in body:
        out["run_at"] = run_at(body["run_at"])
    if "schedule" in body:
        schedule = body.get("schedule")
        if (
            not isinstance(schedule, str)
            or len(schedule.split()) != 5
            or not croniter.is_valid(schedule)
        ):
            raise BadRequest(
                "schedule must be a 5-field cron expression, e.g. '*/5 * * * *'",
                field="schedule",
            )
        try:  # croniter accepts dates that never come, e.g. 31 February
            croniter(schedule, datetime.now(UTC)).get_next(datetime)
        except CroniterBadDateError:
            raise BadRequest("schedule never fires (no such date)", field="schedule") from None
        out["schedule"] = " ".join(schedule.split())
    if "content" in body or not partial:
        content = body.get("content")
        if not isinstance(content, str) or not content:
            raise BadRequest("content is required and must be a non-empty string", field="content")
        out["content"] = content
    if "timezone" in body:
        out["timezone"] = timezone(body["timezone"])
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise BadRequest("enabled must be true or false", field="enabled")
        out["enabled"] = body["enabled"]
    return out


def timezone(value: object) -> str:
    """An IANA zone name that zoneinfo knows."""
    if isinstance(value, str) and value and ".." not in value and not value.startswith("/"):
        try:
            ZoneInfo(value)
            return value
        except (ZoneInfoNotFoundError, ValueError):
            pass
    raise BadRequest("timezone must be an IANA zone name, e.g. Europe/Berlin", field="timezone")


def new_job(body: dict[str, Any]) -> Job:
    fields = _job_fields(body, partial=False)
    fields.setdefault("schedule", None)  # a one-shot (run_at) has none
    return Job(**fields)


def job_changes(body: dict[str, Any], current: Job) -> dict[str, Any]:
    """A PATCH body; a cron job stays a cron job and a one-shot a one-shot."""
    changes = _unrenamed(_job_fields(body, partial=True), current.name, "job")
    if "run_at" in changes and current.run_at is None:
        raise BadRequest("run_at cannot be set on a cron job", field="run_at")
    if "schedule" in changes and current.run_at is not None:
        raise BadRequest("schedule cannot be set on a one-shot job", field="schedule")
    return changes
