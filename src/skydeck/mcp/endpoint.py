"""``/mcp/{channel}`` between the HTTP route and the tools (mcp.md §1, §2).

`McpEndpoint` reads the daemon's live turn tokens and MCP sessions (the
turn side, `wiring.TurnTools`, mints and revokes the tokens). The route
in `app.py` hands it the request's channel, headers and body and renders the
`Reply` it gets back; the JSON-RPC decisions are `protocol`'s, the tools
`tools`'. Answers are always JSON (M2): the server sends no requests or
notifications of its own, so it never needs an SSE stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, validate
from ..auth import ALL_SCOPES, Auth, Unauthorized
from ..errors import BadRequest
from . import protocol
from .access import TOKEN_PREFIX, TURN_SCOPES, Caller, Sessions, TurnTokens, digest
from .protocol import INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, RpcError
from .tools import BY_NAME, TOOLS, Invocation, Toolbox

log = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
#: M10: every credential failure looks the same.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="skydeck"'}
CROSS_ORIGIN = "cross-origin MCP requests are refused"
NO_READ = "this token lacks the agent:read scope"


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, JSON body (None: empty) and extra headers."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def http_error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """skydeck's own error shape, for the HTTP-level checks before JSON-RPC (M5)."""
    return Reply(status, {"ok": False, "error": message}, headers or {})


def scoped_to(channel: str) -> str:
    return f"this token is scoped to channel {channel!r}"


def _rpc_error(err: RpcError, id: protocol.Id = None) -> Reply:
    return Reply(err.status, protocol.error(err, id))


class McpEndpoint:
    def __init__(
        self,
        toolbox: Toolbox,
        auth: Auth,
        *,
        tokens: TurnTokens,
        sessions: Sessions,
    ) -> None:
        """``tokens`` and ``sessions`` are shared with the turn side (`wiring.TurnTools`)."""
        self.toolbox = toolbox
        self.auth = auth
        self.tokens = tokens
        self.sessions = sessions

    # -- HTTP-level checks (M5: origin, credentials, channel) ----------------------

    def gate(self, channel: str, headers: Callable[[str], str | None]) -> Caller | Reply:
        """The caller, or the refusal that answers the request before JSON-RPC."""
        origin, host = headers("Origin"), headers("Host")
        if origin is not None and (
            host is None or origin.strip().lower() != f"http://{host}".lower()
        ):
            return http_error(403, CROSS_ORIGIN)
        caller = self._caller(channel, headers("Authorization"))
        if isinstance(caller, Reply):
            return caller
        if "agent:read" not in caller.scopes:
            return http_error(403, NO_READ)
        try:
            validate.name(channel, "channel")  # R1
        except BadRequest as exc:
            return Reply(400, {"ok": False, "error": exc.message, "field": "channel"})
        return caller

    def _caller(self, channel: str, authorization: str | None) -> Caller | Reply:
        scheme, _, credential = (authorization or "").partition(" ")
        credential = credential.strip()
        bearer = scheme.lower() == "bearer" and bool(credential)
        if bearer and credential.startswith(TOKEN_PREFIX):
            grant = self.tokens.find(credential)
            if grant is None:
                return http_error(401, "unauthorized", CHALLENGE)
            if grant.channel != channel:
                return http_error(403, scoped_to(grant.channel))
            return Caller(channel, TURN_SCOPES, digest(credential), grant)
        if not self.auth.enabled:
            return Caller(channel, ALL_SCOPES, "")
        if not bearer:
            return http_error(401, "unauthorized", CHALLENGE)
        try:
            scopes, only = self.auth.outside_scopes(credential)
        except Unauthorized:
            return http_error(401, "unauthorized", CHALLENGE)
        if only is not None and only != channel:
            return http_error(403, scoped_to(only))
        return Caller(channel, scopes, digest(credential))

    # -- JSON-RPC ------------------------------------------------------------------

    async def post(
        self, caller: Caller, body: bytes, headers: Callable[[str], str | None]
    ) -> Reply:
        try:
            call = protocol.read_message(body)
        except RpcError as err:
            return _rpc_error(err)
        try:
            protocol.check_version_header(headers(VERSION_HEADER))
            session_id = headers(SESSION_HEADER)
            if call.method == "initialize" and call.kind == "request":
                if session_id is not None:
                    raise RpcError(
                        400, INVALID_REQUEST, "initialize must not carry an Mcp-Session-Id header"
                    )
                version, result = protocol.initialize_result(
                    call.params, channel=caller.channel, server_version=__version__
                )
                session = self.sessions.open(caller, version)
                return Reply(200, protocol.result(call.id, result), {SESSION_HEADER: session.id})
            if session_id is None:
                raise RpcError(
                    400, INVALID_REQUEST, "Mcp-Session-Id header is required; send initialize first"
                )
            found = self.sessions.find(session_id, caller)
            if found is None:
                raise RpcError(404, INVALID_REQUEST, "session not found; send initialize again")
            if call.kind != "request":
                return Reply(202)
            return Reply(
                200, protocol.result(call.id, await self._answer(caller, found.version, call))
            )
        except RpcError as err:
            return _rpc_error(err, call.id)
        except Exception:
            log.exception("MCP request failed", extra={"channel": caller.channel})
            internal = RpcError(200, INTERNAL_ERROR, "internal error (logged on the daemon)")
            return _rpc_error(internal, call.id)

    async def _answer(self, caller: Caller, version: str, call: protocol.Call) -> dict[str, Any]:
        if call.method == "ping":
            return {}
        if call.method == "tools/list":
            return {"tools": [tool.to_json() for tool in TOOLS]}
        if call.method == "tools/call":
            params = protocol.tool_call(call.params)
            tool = BY_NAME.get(params.name)
            if tool is None:
                raise RpcError(200, protocol.INVALID_PARAMS, f"Unknown tool: {params.name}")
            invocation = Invocation(caller, version, params.tool_use_id)
            return await self.toolbox.call(tool, invocation, params.arguments)
        raise RpcError(200, METHOD_NOT_FOUND, f"method not found: {call.method}")

    def delete(self, caller: Caller, headers: Callable[[str], str | None]) -> Reply:
        """M4: end a session (204), or the JSON-RPC error of a missing or unknown one."""
        session_id = headers(SESSION_HEADER)
        if session_id is None:
            return _rpc_error(
                RpcError(
                    400, INVALID_REQUEST, "Mcp-Session-Id header is required; send initialize first"
                )
            )
        session = self.sessions.find(session_id, caller)
        if session is None:
            return _rpc_error(
                RpcError(404, INVALID_REQUEST, "session not found; send initialize again")
            )
        self.sessions.close(session)
        return Reply(204)
