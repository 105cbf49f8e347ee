"""HTTP routes (Quart-Trio): parse, validate, call the registry or the store.

No business logic lives here. Every error leaves as
``{"ok": false, "error": "<sentence>", "field": "<name>"}`` with the status of
http-api.md; bad input is never a 500.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import Response, g, request, send_from_directory
from quart.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute

from . import __version__, openapi, validate
from .auth import Auth, Forbidden, Unauthorized, scope_for
from .backends.base import can_run
from .errors import (
    BadRequest,
    Conflict,
    CursorError,
    FencedOut,
    InputError,
    NotFound,
    SkydeckError,
    Stale,
    StoreFailure,
    StoreUnreachable,
    Unavailable,
)
from .guard import NOT_JSON, SECURITY_HEADERS, OriginPolicy, Refusal, is_json
from .mcp.endpoint import McpEndpoint, Reply
from .metrics import Metrics
from .model import AgentSpec, Inbound
from .registry import Registry
from .sandbox import Sandbox
from .scheduler import Scheduler
from .store import Store
from .transports import telegram_http
from .transports.telegram import WEBHOOK_PATH, TelegramReceiver
from .transports.telegram_store import TelegramStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
#: A request body that has not fully arrived by then is cut with 408 (slow-body clients).
BODY_TIMEOUT_S = 30.0
WEB_DIR = Path(__file__).parent / "web"
KEEPALIVE_S = 15.0
DEFAULT_PAGE = 100
MAX_PAGE = 500

Json = tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]


#: The error tree (errors.py) as HTTP statuses; the domain classes carry none.
#: Anything else (a backend or delivery error reaching a request) is a 500.
STATUSES: tuple[tuple[type[SkydeckError], int], ...] = (
    (InputError, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
    (FencedOut, 503),  # another host holds the channel now; the sender may retry
    (Stale, 409),  # the messages moved on meanwhile (another host's turn or removal)
    (StoreUnreachable, 503),  # P6: not confirmed; resend with the same id
    (StoreFailure, 507),  # Insufficient Storage: nothing was kept; send it again
)


def mcp_channel(path: str) -> str | None:
    """The ``{channel}`` of an ``/mcp/{channel}`` path (one segment), else None."""
    prefix, _, channel = path.partition("/mcp/")
    return channel if prefix == "" and channel and "/" not in channel else None


def render(reply: Reply) -> Response:
    """An MCP answer: JSON (never SSE, M2), or an empty body (202, 204)."""
    if reply.body is None:
        return Response(b"", status=reply.status, headers=reply.headers)
    body = json.dumps(reply.body, allow_nan=False, separators=(",", ":"))
    return Response(
        body, status=reply.status, headers=reply.headers, content_type="application/json"
    )


def status_of(error: SkydeckError) -> int:
    return next((status for kind, status in STATUSES if isinstance(error, kind)), 500)


def _error(status: int, message: str, field: str | None = None) -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {"ok": False, "error": message}
    if field is not None:
        body["field"] = field
    return body, status


def _page_limit(raw: str | None, default: int = DEFAULT_PAGE) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_PAGE}", field="limit")
    return int(raw)


def _flag(raw: str | None, field: str) -> bool:
    if raw is None or raw.lower() in ("false", "0", ""):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise BadRequest(f"{field} must be true or false", field=field)


class StrictJSONProvider(DefaultJSONProvider):
    """Every JSON body this daemon sends is strict RFC 8259: a NaN that slipped
    into a record fails loudly here instead of breaking a browser's `JSON.parse`."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class Refused(Exception):
    """A request turned away before auth (wrong Host, cross-origin, not JSON)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def shielded_sends(app: QuartTrio) -> ASGIFramework:
    """The ASGI app Hypercorn serves: ``app`` with every ``send`` shielded.

    Why: Quart-Trio runs a request's handler and its message reader in one
    nursery and cancels it as soon as either is done. The last ``send`` of a
    response is where Hypercorn closes a ``Connection: close`` connection, or
    arms the keep-alive idle timer — and the reader, woken by that very send's
    ``http.disconnect``, cancels it mid-way. Left so, such connections are
    never closed nor timed out (measured: 150 sockets held open for good).
    Hypercorn already shields its socket writes, so this adds no new wait.
    """

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def shielded(message: ASGISendEvent) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await app(scope, receive, shielded)

    return asgi


def create_app(
    registry: Registry,
    store: Store,
    auth: Auth,
    metrics: Metrics | None = None,
    scheduler: Scheduler | None = None,
    *,
    health_extra: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    cluster_view: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    agent_owners: Callable[[], Awaitable[dict[str, str | None]]] | None = None,
    max_body: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    origins: OriginPolicy | None = None,
    sandbox: Sandbox | None = None,
    mcp: McpEndpoint | None = None,
    telegram: tuple[TelegramStore, TelegramReceiver | None] | None = None,
) -> QuartTrio:
    app = QuartTrio("skydeck", static_folder=str(WEB_DIR), static_url_path="/web")
    # No 308 redirects with HTML bodies for `a//b` paths: a path is a route or a JSON 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.config["BODY_TIMEOUT"] = body_timeout_s
    app.json = StrictJSONProvider(app)
    policy = origins or OriginPolicy()
    api_document = openapi.document(max_body=max_body, body_timeout_s=body_timeout_s)

    def agent_json(agent: AgentSpec, owners: dict[str, str | None] | None = None) -> dict[str, Any]:
        status, queued = registry.status(agent.name)
        effective = sandbox.effective(agent) if sandbox is not None else agent.sandbox or "off"
        body = {
            **agent.to_json(),
            "status": status,
            "queued": queued,
            "sandbox_effective": effective,
        }
        if owners is not None:  # P28, on a cluster
            body["owner"] = owners.get(agent.channel)
        return body

    async def read_owners() -> dict[str, str | None] | None:
        return await agent_owners() if agent_owners is not None else None

    def checked(agent: AgentSpec) -> AgentSpec:
        """S2/S3: what only the daemon's sandbox settings can refuse."""
        if sandbox is not None:
            sandbox.check_agent(agent)
        return agent

    async def json_body() -> dict[str, Any]:
        if not is_json(request.headers.get("Content-Type")):
            raise Refused(NOT_JSON)
        raw = await request.get_data(as_text=False)
        assert isinstance(raw, bytes)
        return validate.json_object(raw)

    async def post_inbound(channel: str | None = None) -> Json:
        inbound = validate.inbound(await json_body(), channel=channel)
        if inbound is None:
            return {"ok": True, "state": "ignored"}
        accepted = await registry.submit(inbound)
        await store.flushed()  # R28: committed before the 200 that acknowledges it
        return {"ok": True, "id": accepted.id, "state": accepted.state}

    # -- errors -------------------------------------------------------------------

    @app.before_request
    async def authenticate() -> Response | None:
        if request.path == WEBHOOK_PATH:
            return None  # T14: Telegram's; its secret is checked before the body is read
        # Read every request's body before answering, even on routes that ignore
        # it (a GET with a body): a response sent while body bytes are still in
        # flight could leave a kept-alive connection waiting (seen in the fuzz).
        await request.get_data(cache=True)
        headers = request.headers
        refusal = policy.check(
            path=request.path,
            scheme=request.scheme,
            host=headers.get("Host"),
            origin=headers.get("Origin"),
            fetch_site=headers.get("Sec-Fetch-Site"),
        )
        if refusal is not None:
            raise Refused(refusal)
        if mcp is not None and (channel := mcp_channel(request.path)) is not None:
            # mcp.md M5: origin, credentials and channel come before the method.
            gate = mcp.gate(channel, headers.get)
            if isinstance(gate, Reply):
                return render(gate)
            g.mcp_caller = gate
        if request.path.startswith("/api/") or request.path == "/metrics":
            scope = scope_for(request.method, request.path)
            await auth.check(request.headers.get("Authorization"), scope)
        return None

    @app.after_request
    async def security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.errorhandler(Refused)
    async def refused(error: Refused) -> Json:
        return _error(error.refusal.status, error.refusal.message)

    @app.errorhandler(SkydeckError)
    async def skydeck_error(error: SkydeckError) -> Json:
        return _error(status_of(error), error.message, error.field)

    @app.errorhandler(Unauthorized)
    async def unauthorized(_: Unauthorized) -> Json:
        return _error(401, "unauthorized")

    @app.errorhandler(Forbidden)
    async def forbidden(error: Forbidden) -> Json:
        return _error(403, str(error))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Json:
        status = error.code or 500
        messages = {
            404: "no such route",
            405: "method not allowed on this route",
            408: f"the request body did not arrive within {body_timeout_s:g} s",
            413: f"request body is over the {max_body} byte limit",
        }
        body, status = _error(status, messages.get(status, error.name))
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            # RFC 9110 (15.5.6): a 405 names the methods the route does take.
            return body, status, {"Allow": ", ".join(sorted(error.valid_methods))}
        if status in (408, 413):
            # The rest of the body was never read: this connection cannot carry
            # another request, so tell the client to open a new one.
            return body, status, {"Connection": "close"}
        return body, status

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Json:
        log.exception("unhandled error in a request", exc_info=error)
        return _error(500, "internal error (logged on the daemon)")

    # -- routes -------------------------------------------------------------------

    serve_static = cast(Callable[..., Awaitable[Response]], app.view_functions["static"])

    async def static(filename: str) -> Response:
        # A name longer than the file system takes (ENAMETOOLONG) is no file here,
        # not a 500 (schemathesis found it with a 300-byte name).
        try:
            response = await serve_static(filename=filename)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise NoRoute() from None
        return response

    app.view_functions["static"] = static

    @app.get("/")
    async def web_ui() -> Response:
        """The web UI (static files in skydeck/web, no build step)."""
        return await send_from_directory(WEB_DIR, "index.html")

    @app.get("/api")
    async def index() -> Json:
        # Which backends can run a turn here, so a client can warn before it makes
        # an agent whose every turn would fail: claude needs its CLI (an agent on it
        # is still allowed, the CLI may be installed later); echo and command always run.
        backends = {
            name: can_run(backend) for name, backend in sorted(registry.deps.backends.items())
        }
        return {
            "name": "skydeck",
            "version": __version__,
            "api": "/api",
            "health": "/health",
            "backends": backends,
        }

    @app.get("/api/openapi.json")
    async def openapi_document() -> Json:
        return api_document

    @app.get("/health")
    async def health() -> Json:
        if not registry.accepting:
            return {"status": "stopping"}, 503
        extra = await health_extra() if health_extra is not None else {}
        # P26: the store object (the PostgreSQL host gives its own, with the URL).
        store_json: dict[str, Any] = extra.pop("store", None) or {"kind": store.kind}
        owners: dict[str, str | None] | None = extra.pop("owners", None)
        if store_json.get("state") != "unreachable":
            await registry.refresh_status()  # P24: channels run on another host
        agents = []
        for agent in registry.agents():
            status, queued = registry.status(agent.name)
            entry: dict[str, Any] = {
                "name": agent.name,
                "channel": agent.channel,
                "backend": agent.backend,
                "status": status,
                "queued": queued,
            }
            if owners is not None:
                entry["owner"] = owners.get(agent.channel)
            agents.append(entry)
        buffered: int | None = None
        if store_json.get("state") != "unreachable":
            try:
                buffered = await store.count_buffered()
            except StoreUnreachable:  # the first failed call: the host now says since when
                assert health_extra is not None
                store_json = (await health_extra())["store"]
        if store_json.get("state") == "unreachable":
            # P6: from the first failed heartbeat or store call to the next good
            # heartbeat; nothing is read from the store meanwhile.
            body = {"agents": agents, "buffered": None, **extra}
            return {"status": "unavailable", "store": store_json, **body}, 503
        body = {"agents": agents, "buffered": buffered, **extra}
        if store.error is not None:
            # Writes are failing (a full disk): nothing new can be acknowledged until
            # a commit succeeds again, which the daemon notices by itself.
            reason = StoreFailure(store.error).message
            failing = {**store_json, "state": "error"}
            return {"status": "error", "store": failing, "error": reason, **body}, 503
        return {"status": "ok", "store": store_json, **body}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await metrics.render() if metrics is not None else b""
        return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/api/inbound")
    async def inbound() -> Json:
        return await post_inbound()

    @app.post("/api/inbound/batch")
    async def inbound_batch() -> Json:
        """Many plain inbound bodies, one commit for the lot; answers in order.

        Each item is validated, deduplicated (R8) and stored on its own: a bad
        one gets its error in its place and fails nothing else. A store failure
        fails them all (507), as for a single post.
        """
        results: list[dict[str, Any]] = []
        good: list[tuple[int, Inbound]] = []
        for index, item in enumerate(validate.batch(await json_body())):
            try:
                good.append((index, validate.batch_item(item)))
            except BadRequest as error:
                results.append({"error": error.message, "field": error.field, "index": index})
            else:
                results.append({})  # filled in below, in order
        # All or nothing in the store: a failed write keeps no item of this post
        # (a 507), and no item reaches a channel task before its row is written.
        accepted = await registry.submit_batch([inbound for _, inbound in good])
        for (index, _), one in zip(good, accepted, strict=True):
            results[index] = {"id": one.id, "state": one.state}
        await store.flushed()  # R28: every acknowledged item is committed first
        return {"results": results}

    @app.post("/api/vault/inbound")
    async def vault_inbound() -> Json:
        return await post_inbound()

    @app.post("/api/channels/<channel>/messages")
    async def post_channel_message(channel: str) -> Json:
        return await post_inbound(validate.name(channel, "channel"))

    @app.get("/api/channels/<channel>/messages")
    async def list_channel_messages(channel: str) -> Json:
        validate.name(channel, "channel")
        args = request.args
        after, before = args.get("after"), args.get("before")
        if after is not None and before is not None:
            raise BadRequest("give after or before, not both", field="before")
        try:
            page = await store.list_messages(
                channel,
                limit=_page_limit(args.get("limit")),
                after=after,
                before=before,
                tail=_flag(args.get("tail"), "tail"),
            )
        except CursorError:
            raise BadRequest(
                "cursor is not one this daemon handed out",
                field="after" if after is not None else "before",
            ) from None
        return {
            "messages": [message.to_json() for message in page.messages],
            "next": page.next,
            "prev": page.prev,
        }

    @app.get("/api/channels/<channel>/turn-events")
    async def turn_events(channel: str) -> Response:
        validate.name(channel, "channel")

        async def stream() -> AsyncIterator[bytes]:
            with registry.events.subscribe(channel) as receive:
                await registry.events.ready(channel)
                yield b": subscribed\n\n"
                while True:
                    with trio.move_on_after(KEEPALIVE_S) as idle:
                        try:
                            event = await receive.receive()
                        except (trio.EndOfChannel, trio.ClosedResourceError):
                            return
                    if idle.cancelled_caught:
                        yield b": keep-alive\n\n"
                        continue
                    data = json.dumps(event.to_json(), allow_nan=False)
                    yield f"event: turn\ndata: {data}\n\n".encode()

        response = Response(
            stream(),
            status=200,
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.timeout = None
        return response

    @app.get("/api/messages/<message_id>")
    async def get_message(message_id: str) -> Json:
        message = await store.get_message(message_id)
        if message is None:
            raise NotFound(f"no message with id {message_id!r}", field="id")
        return message.to_json()

    @app.get("/api/threads")
    async def list_threads() -> Json:
        channel = request.args.get("channel")
        if channel is not None:
            validate.name(channel, "channel")
        limit = _page_limit(request.args.get("limit"), default=MAX_PAGE)
        threads = await store.list_threads(channel, limit=limit)
        return {"threads": [thread.to_json() for thread in threads]}

    if cluster_view is not None:  # several hosts on one store (multi-host.md P28)

        @app.get("/api/cluster")
        async def cluster() -> Json:
            return await cluster_view()

    @app.get("/api/agents")
    async def list_agents() -> Json:
        await registry.refresh_status()  # P24: channels run on another host
        owners = await read_owners()
        return {"agents": [agent_json(agent, owners) for agent in registry.agents()]}

    @app.post("/api/agents")
    async def create_agent() -> Json:
        agent = await registry.create(checked(validate.new_agent(await json_body())))
        await store.flushed()
        return agent_json(agent), 201

    @app.get("/api/agents/<name>")
    async def get_agent(name: str) -> Json:
        await registry.refresh_status()
        return agent_json(registry.get(name), await read_owners())

    @app.patch("/api/agents/<name>")
    async def patch_agent(name: str) -> Json:
        body = await json_body()
        current = registry.get(name)
        changes = validate.agent_changes(body, current)
        checked(replace(current, **changes))
        agent = await registry.update(name, changes)
        await store.flushed()
        return agent_json(agent)

    @app.delete("/api/agents/<name>")
    async def delete_agent(name: str) -> Json:
        await registry.remove(name)
        await store.flushed()
        return {"ok": True}

    @app.post("/api/agents/<name>/reset")
    async def reset_agent(name: str) -> Json:
        await registry.reset(name)
        await store.flushed()
        return {"ok": True}

    # -- MCP (mcp.md): the JSON-RPC lives in skydeck.mcp -------------------------

    if mcp is not None:
        endpoint = mcp

        @app.post("/mcp/<channel>", provide_automatic_options=False)
        async def mcp_post(channel: str) -> Response:
            body = await request.get_data(as_text=False)
            assert isinstance(body, bytes)
            return render(await endpoint.post(g.mcp_caller, body, request.headers.get))

        @app.delete("/mcp/<channel>", provide_automatic_options=False)
        async def mcp_delete(channel: str) -> Response:
            return render(endpoint.delete(g.mcp_caller, request.headers.get))

    # -- jobs (cron) --------------------------------------------------------------

    def jobs() -> Scheduler:
        if scheduler is None:
            raise NotFound("this daemon runs no scheduler")
        return scheduler

    @app.get("/api/jobs")
    async def list_jobs() -> Json:
        return {"jobs": [job.to_json() for job in await jobs().jobs()]}

    @app.post("/api/jobs")
    async def create_job() -> Json:
        job = await jobs().create(validate.new_job(await json_body()))
        await store.flushed()
        return job.to_json(), 201

    @app.get("/api/jobs/<name>")
    async def get_job(name: str) -> Json:
        return (await jobs().get(name)).to_json()

    @app.patch("/api/jobs/<name>")
    async def patch_job(name: str) -> Json:
        changes = validate.job_changes(await json_body(), await jobs().get(name))
        job = await jobs().update(name, changes)
        await store.flushed()
        return job.to_json()

    @app.delete("/api/jobs/<name>")
    async def delete_job(name: str) -> Json:
        await jobs().remove(name)
        await store.flushed()
        return {"ok": True}

    @app.post("/api/jobs/<name>/run")
    async def run_job(name: str) -> Json:
        accepted = await jobs().run_now(name)
        await store.flushed()
        return {"ok": True, "id": accepted.id, "state": accepted.state}

    if telegram is not None:
        app.register_blueprint(telegram_http.blueprint(store, *telegram))
    return app
