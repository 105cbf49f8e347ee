"""The JSON-RPC half of ``/mcp/{channel}``, as pure decisions (mcp.md M2-M7).

`read_message` turns a POST body and its two MCP headers into either a
`Call` (a request, a notification or a client's response, ready to route) or
a `Reject` (the HTTP status and JSON-RPC error of the M6 table). Nothing here
touches a socket, a store or a clock: the route in `app.py` feeds bytes in and
renders what comes out, and `endpoint.py` keeps the sessions.

Why hand-written and not the SDK's server: mcp.md §0 (dependencies, an API
that broke between 1.x and 2.x, error bodies and limits that are not
skydeck's). The subset served is small: initialize, ping, tools/list,
tools/call, JSON answers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import BadRequest
from ..validate import json_value

LATEST = "2025-11-25"
#: M3: what ``initialize`` may negotiate, newest first.
SUPPORTED = ("2025-11-25", "2025-06-18", "2025-03-26")
#: A session at this version gets no ``structuredContent`` (it came in 2025-06-18).
NO_STRUCTURED = "2025-03-26"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

Id = str | int | None
Kind = Literal["request", "notification", "response"]


class RpcError(Exception):
    """A JSON-RPC error answer: its HTTP status, code and message (M6)."""

    def __init__(self, status: int, code: int, message: str, id: Id = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.id = id


@dataclass(frozen=True, slots=True)
class Call:
    """One valid JSON-RPC message from the client."""

    kind: Kind
    method: str | None
    id: Id
    params: dict[str, Any] = field(default_factory=dict)


def negotiate(requested: str) -> str:
    """M3: a supported version is echoed; anything else gets the latest."""
    return requested if requested in SUPPORTED else LATEST


def check_version_header(value: str | None) -> None:
    """M3: an absent header means the session's version; an unknown one is a 400."""
    if value is not None and value not in SUPPORTED:
        raise RpcError(
            400,
            INVALID_REQUEST,
            f"unsupported MCP-Protocol-Version {value!r}; supported: {', '.join(SUPPORTED)}",
        )


def _invalid(why: str, id: Id = None) -> RpcError:
    return RpcError(400, INVALID_REQUEST, f"invalid JSON-RPC message: {why}", id)


def _valid_id(message: dict[str, Any]) -> Id:
    raw = message.get("id")
    return (
        raw
        if isinstance(raw, str) or (isinstance(raw, int) and not isinstance(raw, bool))
        else None
    )


def read_message(body: bytes) -> Call:
    """The body as one JSON-RPC message, or raise the `RpcError` of its M6 row."""
    try:
        message = json_value(body)
    except BadRequest:
        raise RpcError(400, PARSE_ERROR, "parse error: the body is not valid JSON") from None
    if isinstance(message, list):
        raise RpcError(
            400,
            INVALID_REQUEST,
            "batch requests are not supported; send one JSON-RPC message per POST",
        )
    if not isinstance(message, dict):
        raise _invalid("expected an object")
    id = _valid_id(message)
    if message.get("jsonrpc") != "2.0":
        raise _invalid('jsonrpc must be "2.0"', id)
    if "id" in message and id is None:
        raise _invalid("id must be a string or an integer")
    if "method" not in message and "id" in message and ("result" in message or "error" in message):
        return Call(kind="response", method=None, id=id)
    method = message.get("method")
    if not isinstance(method, str):
        raise _invalid("method must be a string", id)
    kind: Kind = "request" if "id" in message else "notification"
    params = message.get("params", {})
    if not isinstance(params, dict):
        if kind == "notification":
            return Call(kind=kind, method=method, id=None)
        raise RpcError(200, INVALID_PARAMS, "params must be an object", id)
    return Call(kind=kind, method=method, id=id, params=params)


def initialize_result(
    params: dict[str, Any], *, channel: str, server_version: str
) -> tuple[str, dict[str, Any]]:
    """M7: (the negotiated version, the result), or raise for a bad ``protocolVersion``."""
    requested = params.get("protocolVersion")
    if not isinstance(requested, str):
        raise RpcError(200, INVALID_PARAMS, "params.protocolVersion must be a string")
    version = negotiate(requested)
    return version, {
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "skydeck", "version": server_version},
        "instructions": instructions(channel),
    }


def instructions(channel: str) -> str:
    """M7: what the model reads under "# MCP Server Instructions / ## skydeck"."""
    return (
        f"These tools act through skydeck as channel {channel}. send_message hands work to "
        f"another agent's channel; when that agent's turn ends, a [callback] message arrives "
        f"on {channel}. notify posts progress on {channel} that people see at once; your "
        "final answer is still your normal reply."
    )


@dataclass(frozen=True, slots=True)
class ToolCall:
    """``tools/call`` params, checked (M6): the tool's name, arguments and the CLI's tool-use id."""

    name: str
    arguments: dict[str, Any]
    tool_use_id: str | None


def tool_call(params: dict[str, Any]) -> ToolCall:
    """``tools/call`` params, or raise -32602 (the unknown-tool check is the caller's)."""
    name = params.get("name")
    if not isinstance(name, str):
        raise RpcError(200, INVALID_PARAMS, "params.name must be a string")
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise RpcError(200, INVALID_PARAMS, "params.arguments must be an object")
    meta = params.get("_meta")
    tool_use_id = meta.get("claudecode/toolUseId") if isinstance(meta, dict) else None
    return ToolCall(
        name=name,
        arguments=arguments,
        tool_use_id=tool_use_id if isinstance(tool_use_id, str) and tool_use_id else None,
    )


def result(id: Id, value: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "result": value}


def error(err: RpcError, id: Id = None) -> dict[str, Any]:
    """The error object; ``id`` is the request's when the error came after parsing it."""
    return {
        "jsonrpc": "2.0",
        "id": err.id if err.id is not None else id,
        "error": {"code": err.code, "message": err.message},
    }
