"""The gateway: the daemon's end of a sandbox's only way out (S17-S20).

One `Gateway` per sandboxed process, listening on its own unix socket before
bwrap starts (a socket bound into a sandbox is fixed by inode: re-creating it
later would cut the sandbox off). The relay inside pipes 127.0.0.1:3128 here.

Every request on a connection is routed by its own head, because the CLI
reuses a proxy connection for a request to another target (measured, S17):

- (a) ``/mcp/<the agent's channel>`` (origin-form, or absolute-form to the relay
  itself) goes to the daemon, token unchanged, answer with ``Connection: close``;
  only while the route is on (`Routes.mcp_channel`);
- (b) ``strict``: any other origin-form request goes to the daemon's model API
  with the real credential put in place of the placeholder;
- (c) ``workspace``: ``CONNECT host:port`` or absolute-form ``http://host:port/``
  to an allowlisted target (S18) is tunnelled or forwarded;
- (d) everything else: ``403``, a WARNING and a count (`Routes.on_denied`).

`route` decides (pure, unit-tested per branch); the rest only moves bytes:
h11 parses the heads, httpx (one pooled client, environment proxies ignored)
forwards requests, and a CONNECT becomes a byte splice.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
import httpx
import trio

from .modes import Mode, is_local_address, is_local_host, split_target
from .plan import RELAY_PORT

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CHUNK = 65536
MAX_HEAD_BYTES = 64 * 1024
#: A request body the gateway holds before forwarding it (the API's own limit is 32 MB).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Connections one sandbox is served at once; more wait in the socket's backlog. With
#: the body cap this bounds what one sandbox can make the daemon hold (512 MiB at most).
MAX_CONNECTIONS = 16
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: The names the relay answers to inside the sandbox (absolute-form to itself).
SELF_NAMES = frozenset({f"127.0.0.1:{RELAY_PORT}", f"localhost:{RELAY_PORT}"})


@dataclass(frozen=True, slots=True)
class Routes:
    """What one sandbox may reach (S17, S18)."""

    agent: str
    mode: Mode
    #: S18: exact ``host:port`` targets for (c).
    allow: frozenset[str] = frozenset()
    daemon_port: int | None = None
    #: (a): the agent's own MCP channel and the daemon's M24 base, while MCP is on.
    mcp_channel: str | None = None
    daemon_base: str | None = None
    #: (b): the daemon's model API and the credential header that replaces the client's.
    upstream: str | None = None
    credential: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Tunnel:
    target: str
    #: The address the target's name resolved to when it was checked (S18).
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    url: str
    #: The request's headers as they go out (hop-by-hop dropped, Host set, credential swapped).
    headers: list[tuple[str, str]]
    close: bool = False
    #: For the S18 resolve check; None when the far side is the daemon or the model API.
    target: str | None = None
    address: str | None = None

    def url_to_send(self) -> str:
        """`url`, with the checked address in place of the name (Host keeps the name)."""
        if self.address is None or self.target is None:
            return self.url
        parts = urlsplit(self.url)
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{shown}:{split_target(self.target)[1]}").geturl()


@dataclass(frozen=True, slots=True)
class Deny:
    target: str


Decision = Tunnel | Forward | Deny


def _authority(host: str, port: int | None, default: int) -> str:
    host = host.lower()
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port or default}"


def _outgoing(
    headers: list[tuple[str, str]], host: str, credential: tuple[str, str] | None
) -> list[tuple[str, str]]:
    out = [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in ("host", "content-length")
    ]
    if credential is not None:
        out = [(n, v) for n, v in out if n.lower() not in ("x-api-key", "authorization")]
        out.append(credential)
    return [("host", host), *out]


def route(routes: Routes, method: str, target: str, headers: list[tuple[str, str]]) -> Decision:
    """S17: where one request goes, from its head alone."""
    if method == "CONNECT":
        authority = target.lower()
        if routes.mode == "workspace" and authority in routes.allow:
            return Tunnel(authority)
        return Deny(authority)
    path = target
    if not target.startswith("/"):
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            return Deny(target)
        try:
            authority = _authority(parts.hostname, parts.port, 80)
        except ValueError:
            return Deny(target)
        if authority not in SELF_NAMES:
            if routes.mode == "workspace" and authority in routes.allow:
                return Forward(target, _outgoing(headers, parts.netloc, None), target=authority)
            return Deny(authority)
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
    if (
        routes.mcp_channel is not None
        and routes.daemon_base is not None
        and urlsplit(path).path == f"/mcp/{routes.mcp_channel}"
    ):
        base = routes.daemon_base.rstrip("/")
        return Forward(base + path, _outgoing(headers, urlsplit(base).netloc, None), close=True)
    if routes.mode == "strict" and routes.upstream is not None:
        base = routes.upstream.rstrip("/")
        netloc = urlsplit(base).netloc
        return Forward(base + path, _outgoing(headers, netloc, routes.credential))
    host = next((v for n, v in headers if n.lower() == "host"), f"127.0.0.1:{RELAY_PORT}")
    return Deny(host.lower())


def hits_daemon(addresses: list[str], port: int, daemon_port: int | None) -> bool:
    """S18: after resolving, a loopback or unspecified address on the daemon's port."""
    if daemon_port is None or port != daemon_port:
        return False
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            continue
        if is_local_address(ip):
            return True
    return False


def denial(target: str, agent: str) -> bytes:
    return f"skydeck sandbox: {target} is not allowed for agent {agent}\n".encode()


@dataclass(eq=False)
class Gateway:
    """One sandbox's gateway: a unix socket and the task that serves it."""

    routes: Routes
    socket_path: Path
    client: httpx.AsyncClient
    on_denied: Callable[[str, str], None] | None = None
    _listener: trio.socket.SocketType | None = field(default=None, repr=False)

    def listen(self) -> None:
        """Bind and listen now, before bwrap binds the socket into the sandbox."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.socket_path))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener = trio.socket.from_stdlib_socket(sock)

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve connections until cancelled; then close and unlink the socket (S13)."""
        assert self._listener is not None, "listen() first"
        listener = trio.SocketListener(self._listener)
        slots = trio.Semaphore(MAX_CONNECTIONS)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await slots.acquire()
                    stream = await listener.accept()
                    nursery.start_soon(self._connection, stream, slots)
        finally:
            self._listener.close()
            with suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _connection(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            async with stream:
                await self._requests(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except httpx.HTTPError as exc:
            log.info("sandbox gateway request failed", extra={"error": str(exc)})
        except Exception:  # R25: one connection's failure never ends the sandbox's turn
            log.exception("sandbox gateway connection failed", extra={"agent": self.routes.agent})
        finally:
            slots.release()

    async def _requests(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
            method, target = event.method.decode("ascii"), event.target.decode("latin-1")
            decision = await self._pin_resolved(route(self.routes, method, target, headers))
            if isinstance(decision, Deny):
                self._denied(decision.target)
                await _reply(conn, stream, 403, denial(decision.target, self.routes.agent))
                return
            if isinstance(decision, Tunnel):
                await self._tunnel(conn, stream, decision)
                return
            body = await _read_body(conn, stream)
            if body is None:
                await _reply(conn, stream, 413, b"skydeck sandbox: request body too large\n")
                return
            if not await self._forward(conn, stream, decision, method, body):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _pin_resolved(self, decision: Decision) -> Decision:
        """S18: the daemon's own port is never reached, whatever name resolves to it.

        The name is resolved once, here, and the connection goes to that address
        (the Host header keeps the name): a name that answers differently the
        second time (DNS rebinding) cannot slip past the check.
        """
        if not isinstance(decision, Tunnel | Forward) or decision.target is None:
            return decision
        host, port = split_target(decision.target)
        if is_local_host(host) and port == self.routes.daemon_port:
            return Deny(decision.target)
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        except OSError:
            return decision  # the connect fails with the same error, as a 502
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or hits_daemon(addresses, port, self.routes.daemon_port):
            return Deny(decision.target)
        return replace(decision, address=addresses[0])

    def _denied(self, target: str) -> None:
        log.warning("sandbox egress denied", extra={"agent": self.routes.agent, "target": target})
        if self.on_denied is not None:
            self.on_denied(self.routes.agent, target)

    async def _tunnel(
        self, conn: h11.Connection, stream: trio.SocketStream, tunnel: Tunnel
    ) -> None:
        host, port = split_target(tunnel.target)
        try:
            upstream = await trio.open_tcp_stream(tunnel.address or host, port)
        except OSError as exc:
            await _reply(conn, stream, 502, f"skydeck sandbox: {tunnel.target}: {exc}\n".encode())
            return
        async with upstream:
            await stream.send_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            leftover, _ = conn.trailing_data
            if leftover:
                await upstream.send_all(bytes(leftover))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_splice, stream, upstream)
                nursery.start_soon(_splice, upstream, stream)

    async def _forward(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        forward: Forward,
        method: str,
        body: bytes,
    ) -> bool:
        """Send one request on, stream its answer back; False when the connection ends."""
        request = self.client.build_request(
            method, forward.url_to_send(), headers=forward.headers, content=body
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _reply(conn, stream, 502, f"skydeck sandbox: upstream failed: {exc}\n".encode())
            return False
        try:
            headers = [
                (name, value)
                for name, value in response.headers.multi_items()
                if name.lower() not in HOP_BY_HOP
            ]
            if forward.close:
                headers.append(("connection", "close"))
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status_code, headers=headers)) or b""
            )
            async for chunk in response.aiter_raw():
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        finally:
            await response.aclose()
        return not forward.close


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(CHUNK)
        conn.receive_data(data)  # b"" is EOF: h11 then answers ConnectionClosed


async def _read_body(conn: h11.Connection, stream: trio.SocketStream) -> bytes | None:
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(
            conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        )
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                return None
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise h11.RemoteProtocolError("the request body ended early")


async def _reply(conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes) -> None:
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # a response had begun already: nothing more can be said
    await stream.send_all(data)


async def _splice(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
