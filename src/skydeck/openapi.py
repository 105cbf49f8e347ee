"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/openapi.json``.

Why it is built, not written: every request schema comes from the tables
`validate.py` checks bodies against (`_PLAIN_FIELDS`, `_AGENT_FIELDS`,
`_JOB_FIELDS`, the choices and limits in `model.py` and `validate.py`), and
every response schema from the dataclass that `to_json()` renders
(`AgentSpec`, `Message`, `ThreadRecord`, `Job`). A field added to a table
without a schema here fails the build of this document (a `KeyError` at
start-up, and in `tests/test_openapi.py`); a route added to the app without an
operation here fails that test's comparison with the URL map; a response
that stops matching its schema fails the schemathesis run against a real
daemon. So the document cannot quietly drift from what the daemon does.

Pure code, no I/O: `document()` returns a dict; `app.py` serves it.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import zoneinfo
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from . import __version__
from .auth import scope_for
from .backends.claude_warm import WarmState
from .guard import JSON_MEDIA_TYPE, SECURITY_HEADERS
from .ledger import AgentStatus, MessageState
from .model import (
    BACKENDS,
    MODES,
    NAME_PATTERN,
    QUEUE_MODES,
    SANDBOX_MODES,
    AgentSpec,
    Job,
    Message,
    ThreadRecord,
)
from .sandbox.modes import MAX_EGRESS
from .validate import (
    _AGENT_FIELDS,
    _JOB_FIELDS,
    _PLAIN_FIELDS,
    INT_MAX,
    INT_MIN,
    MAX_BATCH,
    MAX_MCP_ALLOW,
    MAX_NUMBER_DIGITS,
    MAX_REPLY_BYTES,
    MAX_TIMEOUT_S,
    MIN_REPLY_BYTES,
    OUTBOUND_TAGS,
)

OPENAPI_VERSION = "3.1.0"
#: What an inbound post is acknowledged with (`Accepted.state`; R8's `duplicate`).
ACK_STATES = (MessageState.QUEUED.value, MessageState.BUFFERED.value, "duplicate")
#: The fields `Message.to_json` leaves out (internal row number, external id).
MESSAGE_HIDDEN = ("seq", "external_id")

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def name_pattern() -> str:
    """R1 as an ECMA-262 regex: `NAME_PATTERN` is anchored with Python's ``\\Z``."""
    return "^" + NAME_PATTERN.pattern.removesuffix(r"\Z") + "$"


def name_schema() -> Schema:
    return {
        "type": "string",
        "pattern": name_pattern(),
        "description": "R1: 1-64 letters, digits, '.', '_' or '-'; a letter or digit first",
    }


def nullable(schema: Schema) -> Schema:
    """``schema`` or null. Where it has one type, as one schema with a list of types
    rather than an ``anyOf``: a negative-data generator that "breaks" one branch of an
    ``anyOf`` can hit a value the other branch takes (schemathesis did, with null)."""
    kind = schema.get("type")
    if not isinstance(kind, str):
        return {"anyOf": [schema, {"type": "null"}]}
    out = {**schema, "type": [kind, "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


# -- response schemas, from the dataclasses ------------------------------------------


def schema_of(hint: Any) -> Schema:
    """The JSON Schema of a field's type hint (the types `model.py` uses)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return ref("JsonValue")
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX}
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return {"type": "string", "enum": [member.value for member in hint]}
    if origin is Literal:
        return {"type": "string", "enum": list(args)}
    if origin in (Union, types.UnionType):
        present = [arg for arg in args if arg is not type(None)]
        (only,) = present  # model.py's unions in records are all `X | None`
        return nullable(schema_of(only))
    if origin is list:
        return {"type": "array", "items": schema_of(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_of(args[1])}
    raise TypeError(f"no JSON Schema for {hint!r}")


def record(cls: type, *, exclude: tuple[str, ...] = (), extra: Schema | None = None) -> Schema:
    """A record as its `to_json()` renders it: every field present, nothing else.

    Fields named ``*_at`` hold `utc_now`/`iso` timestamps: RFC 3339 date-times.
    """
    hints = get_type_hints(cls)
    properties: Schema = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        schema = schema_of(hints[field.name])
        if field.name.endswith("_at"):
            stamp = {"type": "string", "format": "date-time"}
            schema = stamp if hints[field.name] is str else nullable(stamp)
        properties[field.name] = schema
    properties.update(extra or {})
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _with_optional(schema: Schema, optional: Schema, description: str) -> Schema:
    """``schema`` with properties that only some answers carry."""
    return {
        **schema,
        "properties": {**schema["properties"], **optional},
        "description": description,
    }


def defaults(cls: type) -> dict[str, Any]:
    """The plain default of each field that has one (what a body may leave out)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


# -- request schemas, from validate.py's tables --------------------------------------

#: 5-field cron, as a pattern for the common shapes: each field `*`, `*/step` or a
#: list of values in range, one space apart (day of month 1-28, so it always fires).
_CRON_FIELDS = {
    "minute": "[0-5]?[0-9]",
    "hour": "(?:[01]?[0-9]|2[0-3])",
    "day": "(?:[1-9]|1[0-9]|2[0-8])",
    "month": "(?:[1-9]|1[0-2])",
    "weekday": "[0-6]",
}


#: `validate.run_at` as a pattern: days 01-28 so every match is a real date.
RUN_AT_PATTERN = (
    r"^20[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])T(?:[01][0-9]|2[0-3])"
    r":[0-5][0-9]:[0-5][0-9](?:Z|[+-](?:0[0-9]|1[0-3]):[0-5][0-9])$"
)


def cron_pattern() -> str:
    fields = [rf"(?:\*(?:/[1-9][0-9]?)?|{value}(?:,{value})*)" for value in _CRON_FIELDS.values()]
    return "^" + " ".join(fields) + "$"


def _with_defaults(properties: Schema, cls: type) -> Schema:
    for field, value in defaults(cls).items():
        if field in properties:
            properties[field] = {**properties[field], "default": value}
    return properties


_LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PORT = "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: S2's ``host[:port]`` for a DNS name or IPv4 address (what `modes.parse_target` takes).
EGRESS_PATTERN = f"^{_LABEL}(?:\\.{_LABEL})*(?::{_PORT})?$"


def agent_fields() -> Schema:
    """One schema per `validate._AGENT_FIELDS` entry (a missing one is a KeyError)."""
    name = ref("Name")
    table: Schema = {
        "name": name,
        "channel": name,
        "backend": {"type": "string", "enum": list(BACKENDS)},
        "mode": {"type": "string", "enum": list(MODES)},
        "queue_mode": {"type": "string", "enum": list(QUEUE_MODES)},
        "model": nullable({"type": "string"}),
        "system_prompt": nullable({"type": "string"}),
        "command": nullable(
            {
                "type": "array",
                "description": "argv: the program and its arguments; the prompt arrives on stdin",
                "minItems": 1,
                "prefixItems": [{"type": "string", "minLength": 1}],
                "items": {"type": "string"},
            }
        ),
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_S},
        "max_reply_bytes": {
            "type": "integer",
            "minimum": MIN_REPLY_BYTES,
            "maximum": MAX_REPLY_BYTES,
            "description": "the longest reply kept, in UTF-8 bytes; the rest is cut",
        },
        "sandbox": nullable(
            {
                "type": "string",
                "enum": list(SANDBOX_MODES),
                "description": "S1: the bubblewrap sandbox of its process; null: the daemon's",
            }
        ),
        "egress": {
            "type": "array",
            "maxItems": MAX_EGRESS,
            "items": {"type": "string", "pattern": EGRESS_PATTERN, "maxLength": 200},
            "description": (
                "S2: host:port targets a workspace sandbox may reach (a bare host means 443; "
                "the daemon also takes [IPv6] hosts). Never the daemon's own port on loopback"
            ),
        },
        "mcp": {
            "type": "boolean",
            "description": "whether its turns get skydeck's MCP tools (docs/mcp.md)",
        },
        "mcp_allow": nullable(
            {
                "type": "array",
                "items": name,
                "maxItems": MAX_MCP_ALLOW,
                "description": "the other channels its tools may reach; null: every one",
            }
        ),
    }
    return _with_defaults({field: table[field] for field in sorted(_AGENT_FIELDS)}, AgentSpec)


def job_fields() -> Schema:
    """One schema per `validate._JOB_FIELDS` entry."""
    name = ref("Name")
    table: Schema = {
        "name": name,
        "channel": name,
        "schedule": {
            "type": "string",
            "pattern": cron_pattern(),
            "description": (
                "a 5-field cron expression, e.g. '*/5 * * * *'. The pattern covers the common "
                "shapes; the daemon also takes ranges, steps on ranges and names (MON-FRI) "
                "as croniter reads them, and refuses a date that never comes (31 February)"
            ),
        },
        "run_at": {
            "type": "string",
            "pattern": RUN_AT_PATTERN,
            "description": (
                "a one-shot's time, ISO 8601 with an offset (stored as UTC): it fires once "
                "and then stays listed, disabled. Give exactly one of schedule and run_at"
            ),
        },
        "content": {"type": "string", "minLength": 1},
        "timezone": {
            "type": "string",
            "enum": sorted(zoneinfo.available_timezones()),
            "description": "an IANA zone name (the ones this daemon's tz database holds)",
        },
        "enabled": {"type": "boolean"},
    }
    return _with_defaults({field: table[field] for field in sorted(_JOB_FIELDS)}, Job)


def plain_fields() -> Schema:
    """One schema per `validate._PLAIN_FIELDS` entry (the plain inbound body)."""
    table: Schema = {
        "channel": ref("Name"),
        "content": {"type": "string", "minLength": 1},
        "id": nullable(
            {"type": "string", "description": "an external id: a repeat is a duplicate"}
        ),
        "reply_to": nullable(name_schema()),
        "correlation_id": nullable({"type": "string"}),
        "delegation_depth": {
            "description": "R23: a non-negative integer, or a string of ASCII digits",
            "type": ["integer", "string", "null"],
            "minimum": 0,
            "maximum": INT_MAX,
            "pattern": f"^[0-9]{{1,{MAX_NUMBER_DIGITS}}}$",
        },
        "metadata": {"type": "object", "additionalProperties": ref("JsonValue")},
    }
    return {field: table[field] for field in sorted(_PLAIN_FIELDS)}


def _object(
    properties: Schema,
    required: tuple[str, ...] = (),
    *,
    optional: tuple[str, ...] | None = None,
    **more: Any,
) -> Schema:
    """A closed object; ``optional`` says which keys may be missing (all others required)."""
    if optional is not None:
        required = tuple(key for key in properties if key not in optional)
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return {**schema, **more}


def vault_trigger() -> Schema:
    """A Parachute Vault trigger: routed by ``note.metadata.agent``, else ``.channel``.

    A note tagged outbound (or ``direction: outbound``) is acknowledged as
    ``ignored`` whatever else it holds: a reply must not loop back as a prompt.
    The tag case is said in words only: as a schema it is a ``contains``, for
    which schemathesis 4.32 now and then fails to generate an array ("Cannot
    generate an array with 1 demanded elements"), and any narrower stand-in
    (the tag as the only item, say) would call notes the daemon rightly ignores
    invalid.
    """
    name = ref("Name")
    outbound = {
        "required": ["metadata"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["direction"],
                "properties": {"direction": {"const": "outbound"}},
            }
        },
    }
    not_a_name = {"not": {"type": "string", "minLength": 1}}
    routed = {
        "required": ["id", "content", "metadata"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "content": {"type": "string", "minLength": 1},
            "metadata": {
                "type": "object",
                "properties": {
                    "reply_to": {
                        "type": ["string", "null"],
                        "pattern": "^(?:" + name_pattern()[1:-1] + ")?$",
                    }
                },
                "anyOf": [
                    {"required": ["agent"], "properties": {"agent": name}},
                    {"required": ["channel"], "properties": {"agent": not_a_name, "channel": name}},
                ],
            },
        },
    }
    tags = " or ".join(f"`{tag}`" for tag in sorted(OUTBOUND_TAGS))
    note = {
        "type": "object",
        "description": (
            f"a note whose `tags` hold {tags} is acknowledged as ignored too, whatever "
            "else it holds (said here, not in the schema)"
        ),
        "properties": {
            "tags": {"type": "array", "items": ref("JsonValue")},
            "metadata": {"type": "object", "additionalProperties": ref("JsonValue")},
        },
        "additionalProperties": ref("JsonValue"),
        "anyOf": [outbound, routed],
    }
    return {
        "type": "object",
        "required": ["note"],
        "properties": {"note": note},
        "additionalProperties": ref("JsonValue"),
    }


def json_value() -> Schema:
    """What strict JSON (`validate.json_value`) lets into a body, at any depth."""
    return {
        "description": (
            f"any JSON value whose integers fit in 64 bits and whose numbers have at most "
            f"{MAX_NUMBER_DIGITS} digits; no NaN/Infinity, no lone UTF-16 surrogates"
        ),
        # One schema with a list of types, not an `anyOf` of one per type: a negative
        # generator then cannot "break" one branch with a value another branch takes.
        "type": ["null", "boolean", "string", "number", "array", "object"],
        "items": ref("JsonValue"),
        "additionalProperties": ref("JsonValue"),
        "if": {"type": "integer"},
        "then": {"minimum": INT_MIN, "maximum": INT_MAX},
    }


def schemas() -> Schema:
    agent_extra = {
        "status": schema_of(AgentStatus),
        "queued": {"type": "integer", "minimum": 0},
        "sandbox_effective": {"type": "string", "enum": list(SANDBOX_MODES)},
    }
    agent = agent_fields()
    job = job_fields()
    plain = plain_fields()
    command_needs_argv = {
        "if": {"required": ["backend"], "properties": {"backend": {"const": "command"}}},
        "then": {"required": ["command"], "properties": {"command": {"type": "array"}}},
    }
    egress_needs_workspace = {
        "if": {"required": ["sandbox"], "properties": {"sandbox": {"enum": ["off", "strict"]}}},
        "then": {"properties": {"egress": {"maxItems": 0}}},
    }
    return {
        "Name": name_schema(),
        "JsonValue": json_value(),
        "Error": _object(
            {
                "ok": {"const": False},
                "error": {"type": "string", "minLength": 1},
                "field": {"type": "string", "description": "the field at fault, when one is"},
            },
            ("ok", "error"),
        ),
        "Ok": _object({"ok": {"const": True}}, ("ok",)),
        "Ack": _object(
            {
                "ok": {"const": True},
                "id": {
                    "type": "string",
                    "description": "the message id (the original's for a duplicate)",
                },
                "state": {"type": "string", "enum": list(ACK_STATES)},
            },
            ("ok", "id", "state"),
            description="acknowledged only once the message is committed to the store (R28)",
        ),
        "Ignored": _object(
            {"ok": {"const": True}, "state": {"const": "ignored"}},
            ("ok", "state"),
            description="a vault note tagged outbound: acknowledged, nothing runs",
        ),
        "Agent": _with_optional(
            record(AgentSpec, extra=agent_extra),
            {"owner": nullable({"type": "string"})},
            "owner (P28): the host holding the channel's lease, in GET answers on PostgreSQL",
        ),
        "NewAgent": _object(
            agent, ("name", "channel"), allOf=[command_needs_argv, egress_needs_workspace]
        ),
        "AgentChanges": _object(
            agent,
            description=(
                "a partial update; `name` may repeat the agent's name but not change it, an "
                "agent on the command backend keeps a command, and one with egress keeps "
                "sandbox workspace or null (else 400)"
            ),
            allOf=[
                egress_needs_workspace,
                {
                    "if": command_needs_argv["if"],
                    "then": {"properties": {"command": {"type": "array"}}},
                },
            ],
        ),
        "Job": record(Job),
        "NewJob": _object(
            job,
            ("name", "channel", "content"),
            oneOf=[{"required": ["schedule"]}, {"required": ["run_at"]}],
        ),
        "JobChanges": {
            **_object(
                job,
                description=(
                    "a partial update; `name` may repeat the job's name but not change it; a "
                    "cron job takes no `run_at` and a one-shot no `schedule` (else 400)"
                ),
            ),
            "not": {"required": ["schedule", "run_at"]},
        },
        "Message": record(Message, exclude=MESSAGE_HIDDEN),
        "Thread": record(ThreadRecord),
        "PlainInbound": _object(plain, ("channel", "content")),
        "ChannelInbound": _object(
            {k: v for k, v in plain.items() if k != "channel"},
            ("content",),
            description="a plain inbound body without `channel` (the path names it)",
        ),
        "VaultTrigger": vault_trigger(),
    }


# -- responses -----------------------------------------------------------------------


def headers() -> Schema:
    return {
        name: {"required": True, "schema": {"type": "string", "const": value}}
        for name, value in SECURITY_HEADERS.items()
    }


def response(
    description: str, schema: Schema | None = None, media: str = JSON_MEDIA_TYPE, **more: Any
) -> Schema:
    out: Schema = {
        "description": description,
        "headers": {name: {"$ref": f"#/components/headers/{name}"} for name in SECURITY_HEADERS},
    }
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return {**out, **more}


def error(description: str) -> Schema:
    return response(description, ref("Error"))


def error_responses(*, max_body: int, body_timeout_s: float) -> Schema:
    return {
        "BadJson": error(
            "the body is not strict JSON (RFC 8259) or not a JSON object, or a field is wrong "
            "(`field` names it). Strict: no NaN/Infinity, no integer outside the signed 64-bit "
            f"range, no number of more than {MAX_NUMBER_DIGITS} digits, no lone UTF-16 "
            "surrogate, anywhere in the body"
        ),
        "BadRequest": error("a path segment or query parameter is wrong (`field` names it)"),
        "Unauthorized": response(
            "no valid credential: always exactly this body, whatever part failed",
            _object({"ok": {"const": False}, "error": {"const": "unauthorized"}}, ("ok", "error")),
        ),
        "Forbidden": error(
            "a cross-origin browser request (an `Origin` that is not the daemon's own, or "
            "`Sec-Fetch-Site: cross-site`), or a valid token without the operation's scope"
        ),
        "CrossOrigin": error(
            "a cross-origin browser request (an `Origin` that is not the daemon's own, or "
            "`Sec-Fetch-Site: cross-site`)"
        ),
        "NotFound": error("no such resource (`field` names the path part), or no such route"),
        "Conflict": error("the name, or the channel, is taken (`field` says which)"),
        "RequestTimeout": error(
            f"the request body did not arrive within {body_timeout_s:g} s; the connection closes"
        ),
        "PayloadTooLarge": error(
            f"the request body is over the {max_body} byte limit; the connection closes"
        ),
        "UnsupportedMediaType": error(
            f"a JSON route got a Content-Type other than {JSON_MEDIA_TYPE}"
        ),
        "Misdirected": error(
            "the Host header is not a loopback name or address, nor one the owner allowed "
            "(the DNS-rebinding defence)"
        ),
        "Unavailable": error("the daemon is shutting down; nothing was stored"),
        "StoreFailure": error(
            "the store could not commit (a full disk, an I/O error): nothing of the request "
            "was kept, so it may be sent again"
        ),
    }


# -- operations ----------------------------------------------------------------------

#: The route that serves the web UI's static files (Quart's `static` endpoint).
STATIC_PATH = "/web/{filename}"


#: Where a name or a channel can be taken (409), or a chat is linked already.
CONFLICTS = frozenset(
    {
        ("post", "/api/agents"),
        ("patch", "/api/agents/{name}"),
        ("post", "/api/jobs"),
        ("post", "/api/telegram/links"),
        ("post", "/api/telegram/pair"),
    }
)
#: Telegram's webhook: outside bearer auth, authenticated by its secret header (T14).
TELEGRAM_WEBHOOK = "/api/telegram/webhook"


def _needs_auth(path: str) -> bool:
    """Mirrors `app.authenticate`: `/api/...` and `/metrics`, not `/api` itself
    (nor Telegram's webhook)."""
    return (path.startswith("/api/") and path != TELEGRAM_WEBHOOK) or path == "/metrics"


def _api_family(path: str) -> bool:
    """Mirrors `guard.OriginPolicy.check`: where a cross-origin browser request is refused."""
    return path.startswith("/api/") or path in ("/api", "/metrics")


def _path_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _body(*schemas_: Schema) -> Schema:
    schema = schemas_[0] if len(schemas_) == 1 else {"oneOf": list(schemas_)}
    return {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}


def _ok(description: str, schema: Schema) -> Schema:
    return {"200": response(description, schema)}


def _link(operation_id: str, **parameters: str) -> Schema:
    return {"operationId": operation_id, "parameters": parameters}


def operations() -> dict[tuple[str, str], Schema]:
    """Every route, keyed by (method, OpenAPI path); operationId is the app's endpoint."""
    name = ref("Name")
    channel = _path_param("channel", name, "the channel (R1)")
    agent_name = _path_param("name", name, "the agent's name")
    job_name = _path_param("name", name, "the job's name")
    limit = {"type": "integer", "minimum": 1, "maximum": 500}
    cursor = {"type": "string", "pattern": "^[0-9]{1,18}$"}
    flag = {  # `app._flag`: true or false, also 1 or 0, any case; empty is false
        "type": "string",
        "pattern": "^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[01])?$",
    }
    ack = _ok("the message is committed (R28)", ref("Ack"))
    inbound_ack = _ok(
        "the message is committed (R28), or an outbound vault note is ignored",
        {"oneOf": [ref("Ack"), ref("Ignored")]},
    )
    agent_links = {
        "get": _link("get_agent", name="$response.body#/name"),
        "patch": _link("patch_agent", name="$response.body#/name"),
        "delete": _link("delete_agent", name="$response.body#/name"),
        "reset": _link("reset_agent", name="$response.body#/name"),
        "post": _link("post_channel_message", channel="$response.body#/channel"),
        "transcript": _link("list_channel_messages", channel="$response.body#/channel"),
    }
    job_links = {
        "get": _link("get_job", name="$response.body#/name"),
        "patch": _link("patch_job", name="$response.body#/name"),
        "delete": _link("delete_job", name="$response.body#/name"),
        "run": _link("run_job", name="$response.body#/name"),
    }
    message_link = {"get": _link("get_message", message_id="$response.body#/id")}
    health_agent = _object(
        {
            "name": name,
            "channel": name,
            "backend": {"type": "string", "enum": list(BACKENDS)},
            "status": schema_of(AgentStatus),
            "queued": {"type": "integer", "minimum": 0},
            "owner": nullable({"type": "string"}),
        },
        optional=("owner",),
        description="owner (P26): the host holding the channel's lease, on PostgreSQL only",
    )
    health_store = _object(
        {
            "kind": {"type": "string", "enum": ["sqlite", "postgres"]},
            "url": {"type": "string"},
            "state": {"type": "string", "enum": ["error", "unreachable"]},
            "since": {"type": "string"},
        },
        optional=("url", "state", "since"),
        description="P26/P6: the store; state only while it fails (url and since: PostgreSQL)",
    )
    health_host = _object(
        {
            "id": {"type": "string"},
            "incarnation": nullable({"type": "integer"}),
            "owned": {"type": "integer", "minimum": 0},
            "roles": {"type": "array", "items": {"type": "string"}},
            "lease_ttl_s": {"type": "number"},
            "heartbeat_age_s": nullable({"type": "number"}),
            "hosts_alive": nullable({"type": "integer", "minimum": 0}),
        },
        optional=(),
        description="P26: this host of a PostgreSQL cluster",
    )
    vault = _object(
        {
            "url": {"type": "string"},
            "outbox": {"type": "integer", "minimum": 0},
            "definitions": {"type": "integer", "minimum": 0},
            "problems": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        ("url", "outbox", "definitions", "problems"),
    )
    count = {"type": "integer", "minimum": 0}
    warm = _object(
        {
            "max": count,
            "idle_timeout_s": {"type": "number", "minimum": 0},
            "processes": {
                "type": "array",
                "items": _object(
                    {
                        "agent": name,
                        "pid": nullable({"type": "integer"}),
                        "state": schema_of(WarmState),
                        "turns": count,
                        "rss_bytes": nullable(count),
                        "idle_s": nullable({"type": "number", "minimum": 0}),
                    },
                    ("agent", "pid", "state", "turns", "rss_bytes", "idle_s"),
                ),
            },
        },
        ("max", "idle_timeout_s", "processes"),
        description="the warm claude processes (issue 14)",
    )
    sandbox = _object(
        {
            "available": {"type": "boolean"},
            "default": {"type": "string", "enum": list(SANDBOX_MODES)},
            "required": {"type": "boolean"},
            "bwrap": {"type": "string"},
            "reason": {"type": "string"},
        },
        optional=("bwrap", "reason"),
        description="S5: the start-up probe, and the mode of agents without their own",
    )
    health_body = {
        "store": health_store,
        "host": health_host,
        "agents": {"type": "array", "items": health_agent},
        "buffered": count,
        "claude_warm": warm,
        "sandbox": sandbox,
        "vault": vault,
    }
    return {
        **telegram_operations(),
        ("get", "/"): {
            "operationId": "web_ui",
            "summary": "The web UI",
            "responses": {"200": response("the UI's page", {"type": "string"}, "text/html")},
        },
        ("get", STATIC_PATH): {
            "operationId": "static",
            "summary": "The web UI's static files (script, style, icon)",
            "parameters": [
                {
                    **_path_param("filename", {"type": "string"}, "a file of the UI"),
                    "example": "app.js",
                }
            ],
            "responses": {"200": response("the file", {"type": "string"}, "*/*")},
        },
        ("get", "/api"): {
            "operationId": "index",
            "summary": "What this daemon is, and which backends can run a turn here",
            "responses": _ok(
                "the daemon",
                _object(
                    {
                        "name": {"const": "skydeck"},
                        "version": {"type": "string"},
                        "api": {"const": "/api"},
                        "health": {"const": "/health"},
                        "backends": _object(
                            {backend: {"type": "boolean"} for backend in BACKENDS},
                            BACKENDS,
                            description="true where a turn can run (claude needs its CLI)",
                        ),
                    },
                    ("name", "version", "api", "health", "backends"),
                ),
            ),
        },
        ("get", "/api/openapi.json"): {
            "operationId": "openapi_document",
            "summary": "This document",
            "responses": _ok("the OpenAPI 3.1 document", {"type": "object"}),
        },
        ("get", "/health"): {
            "operationId": "health",
            "summary": "Liveness, and every agent's status (no message content)",
            "responses": {
                "200": response(
                    "serving",
                    _object(
                        {"status": {"const": "ok"}, **health_body},
                        optional=("claude_warm", "sandbox", "vault", "host"),
                    ),
                ),
                "503": response(
                    "shutting down; the store cannot commit (a full disk): nothing new is "
                    "acknowledged until a commit succeeds again, which the daemon notices itself; "
                    "or a PostgreSQL store is unreachable (P6), until the next good heartbeat",
                    {
                        "oneOf": [
                            _object({"status": {"const": "stopping"}}, ("status",)),
                            _object(
                                {
                                    "status": {"const": "error"},
                                    "error": {"type": "string", "minLength": 1},
                                    **health_body,
                                },
                                optional=("claude_warm", "sandbox", "vault", "host"),
                            ),
                            _object(
                                {
                                    "status": {"const": "unavailable"},
                                    **health_body,
                                    "buffered": {"type": "null"},
                                },
                                optional=("claude_warm", "sandbox", "vault"),
                            ),
                        ]
                    },
                ),
            },
        },
        ("get", "/metrics"): {
            "operationId": "prometheus",
            "summary": "Prometheus metrics",
            "responses": {"200": response("the metrics", {"type": "string"}, "text/plain")},
        },
        ("post", "/api/inbound"): {
            "operationId": "inbound",
            "summary": "Post a message (the webhook): a plain body or a Parachute Vault trigger",
            "requestBody": _body(ref("PlainInbound"), ref("VaultTrigger")),
            "responses": {**inbound_ack, "503": {"$ref": "#/components/responses/Unavailable"}},
        },
        ("post", "/api/inbound/batch"): {
            "operationId": "inbound_batch",
            "summary": "Post many plain messages in one commit; answered in order",
            "requestBody": {
                "required": True,
                "content": {
                    JSON_MEDIA_TYPE: {
                        "schema": _object(
                            {
                                "messages": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": MAX_BATCH,
                                    "items": ref("JsonValue"),
                                    "description": (
                                        "plain inbound bodies (PlainInbound); an item that "
                                        "is not one gets its error in its place and fails "
                                        "nothing else"
                                    ),
                                }
                            },
                            ("messages",),
                        ),
                        "example": {"messages": [{"channel": "demo", "content": "hello"}]},
                    }
                },
            },
            "responses": {
                **_ok(
                    "every item committed or refused, in order (R28; R8 per item)",
                    _object(
                        {
                            "results": {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        _object(
                                            {
                                                "id": {"type": "string"},
                                                "state": {
                                                    "type": "string",
                                                    "enum": list(ACK_STATES),
                                                },
                                            },
                                            ("id", "state"),
                                        ),
                                        _object(
                                            {
                                                "error": {"type": "string", "minLength": 1},
                                                "field": nullable({"type": "string"}),
                                                "index": {"type": "integer", "minimum": 0},
                                            },
                                            ("error", "field", "index"),
                                        ),
                                    ]
                                },
                            }
                        },
                        ("results",),
                    ),
                ),
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        },
        ("post", "/api/vault/inbound"): {
            "operationId": "vault_inbound",
            "summary": "The same as /api/inbound, the address a Parachute Vault trigger calls",
            "requestBody": _body(ref("PlainInbound"), ref("VaultTrigger")),
            "responses": {**inbound_ack, "503": {"$ref": "#/components/responses/Unavailable"}},
        },
        ("post", "/api/channels/{channel}/messages"): {
            "operationId": "post_channel_message",
            "summary": "Post a message to a channel",
            "parameters": [channel],
            "requestBody": _body(ref("ChannelInbound")),
            "responses": {
                "200": {**ack["200"], "links": message_link},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        },
        ("get", "/api/channels/{channel}/messages"): {
            "operationId": "list_channel_messages",
            "summary": "A page of the channel's transcript, oldest first, both directions",
            "parameters": [
                channel,
                {
                    # One exploded object, so that "after or before, not both" can be said.
                    "name": "page",
                    "in": "query",
                    "style": "form",
                    "explode": True,
                    "required": False,
                    "description": "which page: `limit`, and `after`, `before` or `tail`",
                    "schema": {
                        "type": "object",
                        "properties": {
                            "limit": {**limit, "default": 100, "description": "page size"},
                            "after": {**cursor, "description": "the page after (`next`)"},
                            "before": {**cursor, "description": "the page before (`prev`)"},
                            "tail": {**flag, "description": "the newest page"},
                        },
                        "not": {"required": ["after", "before"]},
                    },
                },
            ],
            "responses": _ok(
                "the page",
                _object(
                    {
                        "messages": {"type": "array", "items": ref("Message")},
                        "next": nullable(cursor),
                        "prev": nullable(cursor),
                    },
                    ("messages", "next", "prev"),
                ),
            ),
        },
        ("get", "/api/channels/{channel}/turn-events"): {
            "operationId": "turn_events",
            "summary": "The channel's live turn events (server-sent events, never ends)",
            "parameters": [channel],
            "responses": {
                "200": response(
                    "`event: turn` frames whose `data` is a JSON event with `kind` (queued, init, "
                    "text, tool, notify, done, error) and `message_id`; an `error` with "
                    "`retrying: true` closes a dead host's partial reply before the message "
                    "runs again (P15); a comment keep-alive every 15 s",
                    {"type": "string"},
                    "text/event-stream",
                )
            },
        },
        ("get", "/api/messages/{message_id}"): {
            "operationId": "get_message",
            "summary": "One message",
            "parameters": [_path_param("message_id", {"type": "string"}, "the message id")],
            "responses": _ok("the message", ref("Message")),
        },
        ("get", "/api/threads"): {
            "operationId": "list_threads",
            "summary": "The newest turn records, oldest first",
            "parameters": [
                _query("channel", name, "only this channel's"),
                _query("limit", {**limit, "default": 500}, "how many"),
            ],
            "responses": _ok(
                "the records",
                _object({"threads": {"type": "array", "items": ref("Thread")}}, ("threads",)),
            ),
        },
        ("get", "/api/agents"): {
            "operationId": "list_agents",
            "summary": "Every agent, by name",
            "responses": _ok(
                "the agents",
                _object({"agents": {"type": "array", "items": ref("Agent")}}, ("agents",)),
            ),
        },
        ("post", "/api/agents"): {
            "operationId": "create_agent",
            "summary": "Create an agent (it serves its channel at once)",
            "requestBody": _body(ref("NewAgent")),
            "responses": {"201": response("the agent", ref("Agent"), links=agent_links)},
        },
        ("get", "/api/agents/{name}"): {
            "operationId": "get_agent",
            "summary": "One agent",
            "parameters": [agent_name],
            "responses": _ok("the agent", ref("Agent")),
        },
        ("patch", "/api/agents/{name}"): {
            "operationId": "patch_agent",
            "summary": "Change an agent (from its next turn; a new channel follows R3)",
            "parameters": [agent_name],
            "requestBody": _body(ref("AgentChanges")),
            "responses": _ok("the agent", ref("Agent")),
        },
        ("delete", "/api/agents/{name}"): {
            "operationId": "delete_agent",
            "summary": "Delete an agent (its running turn is cancelled, R26)",
            "parameters": [agent_name],
            "responses": _ok("deleted", ref("Ok")),
        },
        ("post", "/api/agents/{name}/reset"): {
            "operationId": "reset_agent",
            "summary": "The agent's next turn starts a fresh conversation (R27)",
            "parameters": [agent_name],
            "responses": _ok("reset", ref("Ok")),
        },
        ("get", "/api/jobs"): {
            "operationId": "list_jobs",
            "summary": "Every cron job, by name",
            "responses": _ok(
                "the jobs", _object({"jobs": {"type": "array", "items": ref("Job")}}, ("jobs",))
            ),
        },
        ("post", "/api/jobs"): {
            "operationId": "create_job",
            "summary": "Create a cron job",
            "requestBody": _body(ref("NewJob")),
            "responses": {"201": response("the job", ref("Job"), links=job_links)},
        },
        ("get", "/api/jobs/{name}"): {
            "operationId": "get_job",
            "summary": "One job",
            "parameters": [job_name],
            "responses": _ok("the job", ref("Job")),
        },
        ("patch", "/api/jobs/{name}"): {
            "operationId": "patch_job",
            "summary": "Change a job (a new schedule moves next_run_at at once)",
            "parameters": [job_name],
            "requestBody": _body(ref("JobChanges")),
            "responses": _ok("the job", ref("Job")),
        },
        ("delete", "/api/jobs/{name}"): {
            "operationId": "delete_job",
            "summary": "Delete a job",
            "parameters": [job_name],
            "responses": _ok("deleted", ref("Ok")),
        },
        ("post", "/api/jobs/{name}/run"): {
            "operationId": "run_job",
            "summary": "Fire a job now (counts as its previous run)",
            "parameters": [job_name],
            "responses": {
                "200": {**ack["200"], "links": message_link},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        },
    }


def telegram_operations() -> dict[tuple[str, str], Schema]:
    """telegram.md §9: links, pairings, the outbox, and Telegram's webhook."""
    text = {"type": "string"}
    maybe_text = nullable(text)
    chat_id = {
        "oneOf": [
            {"type": "integer", "minimum": -9999999999999999, "maximum": 9999999999999999},
            {"type": "string", "pattern": "^-?[0-9]{1,16}$"},
        ],
        "description": "the chat's id, as an integer or a decimal string",
    }
    user_id = {
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": INT_MAX},
            {"type": "string", "pattern": "^[0-9]{1,20}$"},
        ]
    }
    trigger = {"type": "string", "enum": ["all", "mention"]}
    deliver = {"type": "string", "enum": ["all", "origin"]}
    allow = nullable({"type": "array", "items": user_id, "maxItems": 1000})
    link = _object(
        {
            "id": text,
            "chat_id": text,
            "topic_id": nullable({"type": "integer"}),
            "channel": ref("Name"),
            "chat_type": maybe_text,
            "title": maybe_text,
            "trigger": trigger,
            "deliver": deliver,
            "allow_users": nullable({"type": "array", "items": text}),
            "blocked_at": maybe_text,
            "created_at": text,
        },
        optional=(),
    )
    link_fields = {"channel": ref("Name"), "trigger": trigger, "deliver": deliver}
    new_link = _object(
        {
            "chat_id": chat_id,
            "topic_id": {"type": "integer", "minimum": 1, "maximum": INT_MAX},
            **link_fields,
            "allow_users": allow,
        },
        ("chat_id", "channel"),
        description="a private chat (a positive id) takes trigger all only (else 400)",
    )
    changes = _object({**link_fields, "allow_users": allow})
    pairing = _object(
        {
            "code": text,
            "chat_id": text,
            "topic_id": nullable({"type": "integer"}),
            "chat_type": text,
            "title": maybe_text,
            "user": text,
            "expires_at": text,
        },
        optional=(),
    )
    item = _object(
        {
            "seq": {"type": "integer"},
            "chat_id": text,
            "message_id": maybe_text,
            "part": {"type": "integer", "minimum": 1},
            "parts": {"type": "integer", "minimum": 1},
            "kind": {"type": "string", "enum": ["reply", "notice"]},
            "state": {"type": "string", "enum": ["pending", "sent", "refused"]},
            "attempts": {"type": "integer", "minimum": 0},
            "last_error": maybe_text,
            "created_at": text,
        },
        optional=(),
    )
    link_id = _path_param("lid", text, "the link id: <chat_id> or <chat_id>:<topic_id>")
    created = {"201": response("the link", link)}
    not_found = {"404": {"$ref": "#/components/responses/NotFound"}}
    return {
        ("get", "/api/telegram/links"): {
            "operationId": "telegram.list_links",
            "summary": "Telegram links, oldest first",
            "parameters": [_query("channel", ref("Name"), "only this channel's links")],
            "responses": _ok("the links", _object({"links": {"type": "array", "items": link}})),
        },
        ("post", "/api/telegram/links"): {
            "operationId": "telegram.create_link",
            "summary": "Link a chat (or a forum topic of it) to a channel",
            "requestBody": _body(new_link),
            "responses": created,
        },
        ("patch", "/api/telegram/links/{lid}"): {
            "operationId": "telegram.patch_link",
            "summary": "Change a link",
            "parameters": [link_id],
            "requestBody": _body(changes),
            "responses": _ok("the link", link),
        },
        ("delete", "/api/telegram/links/{lid}"): {
            "operationId": "telegram.delete_link",
            "summary": "Remove a link (its chat is not stored from the next update on)",
            "parameters": [link_id],
            "responses": _ok("deleted", ref("Ok")),
        },
        ("get", "/api/telegram/pairings"): {
            "operationId": "telegram.list_pairings",
            "summary": "Chats waiting to be paired (codes valid 10 minutes)",
            "responses": _ok(
                "the pairings", _object({"pairings": {"type": "array", "items": pairing}})
            ),
        },
        ("post", "/api/telegram/pair"): {
            "operationId": "telegram.pair_chat",
            "summary": "Link the chat that got this pairing code",
            "requestBody": _body(
                _object(
                    {"code": {"type": "string", "minLength": 1}, **link_fields},
                    ("code", "channel"),
                )
            ),
            "responses": {**created, **not_found},
        },
        ("get", "/api/telegram/outbox"): {
            "operationId": "telegram.outbox",
            "summary": "Parts and notices pending, and those refused in the last 24 h (no text)",
            "responses": _ok("the rows", _object({"items": {"type": "array", "items": item}})),
        },
        ("post", TELEGRAM_WEBHOOK): {
            "operationId": "telegram.webhook",
            "summary": "Telegram's webhook (webhook mode only; its secret header, no bearer)",
            "parameters": [
                {
                    "name": "X-Telegram-Bot-Api-Secret-Token",
                    "in": "header",
                    "required": False,
                    "schema": text,
                }
            ],
            "requestBody": {
                "required": True,
                "content": {JSON_MEDIA_TYPE: {"schema": {"type": "object"}}},
            },
            "responses": {
                **_ok(
                    "stored, or an unusable update ignored", {"oneOf": [ref("Ok"), ref("Ignored")]}
                ),
                "401": response("no or a wrong secret header", ref("Error")),
                **not_found,
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        },
    }


def mcp_operations() -> dict[tuple[str, str], Schema]:
    """``/mcp/{channel}`` (mcp.md §1): Streamable HTTP with JSON answers. Its errors
    after the HTTP-level checks are JSON-RPC error objects, not skydeck's shape."""
    channel = _path_param("channel", ref("Name"), "the channel the caller acts as (R1)")
    session = {
        "name": "Mcp-Session-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "description": "the id `initialize` answered with; every other message needs it",
    }
    rpc_id = {"type": ["string", "integer"]}
    message = {
        "type": "object",
        "description": "one JSON-RPC 2.0 message (no batches): a request, a notification, "
        "or a response to the server",
        "required": ["jsonrpc"],
        "properties": {
            "jsonrpc": {"const": "2.0"},
            "id": rpc_id,
            "method": {"type": "string"},
            "params": {"type": "object"},
        },
    }
    rpc_error = _object(
        {
            "jsonrpc": {"const": "2.0"},
            "id": nullable(rpc_id),
            "error": _object(
                {"code": {"type": "integer"}, "message": {"type": "string"}}, ("code", "message")
            ),
        },
        ("jsonrpc", "id", "error"),
    )
    answer = {
        "oneOf": [
            _object(
                {"jsonrpc": {"const": "2.0"}, "id": rpc_id, "result": {"type": "object"}},
                ("jsonrpc", "id", "result"),
            ),
            rpc_error,
        ]
    }
    refused = {"$ref": "#/components/schemas/Error"}
    unauthorized = {"$ref": "#/components/responses/Unauthorized"}
    security = [{"bearer": ["agent:read"]}, {"turnToken": []}]
    not_allowed = response("a method other than POST and DELETE (`Allow` names them)", refused)
    return {
        ("post", "/mcp/{channel}"): {
            "operationId": "mcp_post",
            "summary": "One MCP message (initialize, ping, tools/list, tools/call, notifications)",
            "parameters": [channel, session],
            "requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": message}}},
            "security": security,
            "responses": {
                "200": response(
                    "the JSON-RPC answer (a result, or an error with HTTP 200: unknown "
                    "method, bad params, unknown tool); `initialize` sets Mcp-Session-Id",
                    answer,
                ),
                "202": response("a notification or a response: accepted, no body"),
                "400": response(
                    "a JSON-RPC error (a parse error, a batch, an invalid message, an "
                    "unsupported MCP-Protocol-Version, a missing session id), or a bad channel",
                    {"oneOf": [rpc_error, refused]},
                ),
                "401": unauthorized,
                "403": response(
                    "a cross-origin request, a token scoped to another channel, or a token "
                    "without agent:read",
                    refused,
                ),
                "404": response("the session is unknown, ended or another's", rpc_error),
                "405": not_allowed,
            },
        },
        ("delete", "/mcp/{channel}"): {
            "operationId": "mcp_delete",
            "summary": "End an MCP session",
            "parameters": [channel, {**session, "required": True}],
            "security": security,
            "responses": {
                "204": response("the session has ended"),
                "400": response(
                    "no Mcp-Session-Id header, or a bad channel", {"oneOf": [rpc_error, refused]}
                ),
                "401": unauthorized,
                "403": response("a cross-origin request or a token for another channel", refused),
                "404": response("the session is unknown, ended or another's", rpc_error),
            },
        },
    }


def _errors_for(method: str, path: str, operation: Schema) -> Schema:
    """The error responses every operation shares, by what its route goes through."""
    shared = {"408": "RequestTimeout", "413": "PayloadTooLarge", "421": "Misdirected"}
    if path.startswith("/mcp/"):  # its own checks and error shapes (`mcp_operations`)
        return {
            status: {"$ref": f"#/components/responses/{name}"} for status, name in shared.items()
        }
    if _api_family(path):
        shared["403"] = "CrossOrigin"
    if _needs_auth(path):
        shared |= {"401": "Unauthorized", "403": "Forbidden"}
    if "requestBody" in operation:
        shared |= {"400": "BadJson", "415": "UnsupportedMediaType"}
    elif path.startswith("/api/channels/") or any(
        p["in"] == "query" for p in operation.get("parameters", ())
    ):
        shared["400"] = "BadRequest"  # a query parameter, or the channel in the path (R1)
    if "{" in path:
        shared["404"] = "NotFound"
    if (method, path) in CONFLICTS:
        shared["409"] = "Conflict"
    if method != "get":
        shared["507"] = "StoreFailure"  # every write commits before it answers
    return {status: {"$ref": f"#/components/responses/{name}"} for status, name in shared.items()}


def document(*, max_body: int, body_timeout_s: float) -> Schema:
    """The OpenAPI 3.1 document of this daemon's HTTP API."""
    paths: Schema = {}
    for (method, path), operation in (operations() | mcp_operations()).items():
        responses = {**_errors_for(method, path, operation), **operation["responses"]}
        security: list[Schema] = operation.get(
            "security", [{"bearer": [scope_for(method.upper(), path)]}] if _needs_auth(path) else []
        )
        paths.setdefault(path, {})[method] = {
            **operation,
            "responses": dict(sorted(responses.items())),
            "security": security,
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "skydeck",
            "version": __version__,
            "description": (
                "Run AI coding agents behind chat channels. JSON in, JSON out, except the SSE "
                "stream, /metrics and the web UI. Every error is "
                '`{"ok": false, "error": "<sentence>", "field": "<name>"}` (`field` when one '
                "field is at fault). HEAD (on GET routes) and OPTIONS are answered by the "
                "framework; any other method not listed on a path is 405 with `Allow`, and a "
                "path that is no route is 404 `no such route`. Without a token or JWT secret "
                "configured the daemon listens on loopback only and needs no credential."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "responses": error_responses(max_body=max_body, body_timeout_s=body_timeout_s),
            "headers": headers(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": (
                        "the static token (SKYDECK_TOKEN, every scope), an HS256 JWT "
                        "(SKYDECK_JWT_SECRET) or an RS256 Parachute hub token (SKYDECK_JWKS_URL) "
                        "whose space-separated `scope` claim holds the listed scope"
                    ),
                },
                "turnToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": (
                        "a turn token (`sdt_…`): an agent's own, for its channel's /mcp path "
                        "only, dead when its turn ends (docs/mcp.md)"
                    ),
                },
            },
        },
    }
