"""Wires the store, the registry and the HTTP app into one Trio nursery.

    Service.run
    ├── WarmPool.run           (warm claude processes, W2; closed after the registry, W16)
    ├── Registry.serve         (a task per registered channel, the store flusher)
    ├── Scheduler.run          (cron jobs: sleeps until the next due slot)
    ├── VaultMirror.run_outbox, VaultSync.run   (with --vault-url)
    └── hypercorn.trio.serve   (the HTTP app; its shutdown_trigger is ours)

`stop` is the one way down (R29): stop accepting (posts get 503), start no
new turn, give running turns a grace period, cancel the rest (their messages
stay `queued`/`working` in the store and replay at next start, R28), and only
then let Hypercorn stop listening.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import BODY_TIMEOUT_S, MAX_BODY_BYTES, create_app, shielded_sends
from .auth import JWKS_REFRESH_S, JWKS_TTL_S, Auth, HubKeys
from .backends import CommandBackend, EchoBackend
from .backends.base import Backend
from .backends.claude import ClaudeBackend, find_claude, has_credentials
from .backends.claude_warm import WarmConfig
from .definitions import VaultSync
from .events import TurnEvents
from .guard import OriginPolicy, is_loopback
from .metrics import Metrics
from .model import AgentSpec
from .procs import ProcessRegistry
from .registry import DEFAULT_BUFFER_CAP, DEFAULT_MAX_TURNS, Registry
from .scheduler import Scheduler, WallClock
from .store import Store
from .transports.vault import VaultClient, VaultMirror
from .turn import TurnDeps

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1941
DB_NAME = "skydeck.db"
DEFAULT_GRACE_S = 30.0
#: An idle keep-alive connection (or one that never sends its headers) closes after this.
#: Longer than httpx's (the CLI's) 5 s pool expiry, so a client drops an idle connection
#: before the server does, and never sends a request into a socket closing under it.
KEEPALIVE_S = 10.0


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "skydeck"


class ConfigError(Exception):
    """A setting that stops the daemon from starting, said as one sentence."""


@dataclass(slots=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    token: str | None = None
    demo: bool = True
    insecure: bool = False
    buffer_cap: int = DEFAULT_BUFFER_CAP
    max_turns: int = DEFAULT_MAX_TURNS
    max_body: int = MAX_BODY_BYTES
    jwt_secret: str | None = None
    grace_s: float = DEFAULT_GRACE_S
    vault_url: str | None = None
    vault_token: str | None = None
    vault_poll_s: float = 60.0
    #: Parachute hub tokens: the hub's JWKS and the `iss` its tokens carry
    #: (default: the JWKS URL's origin).
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwks_ttl_s: float = JWKS_TTL_S
    jwks_refresh_s: float = JWKS_REFRESH_S
    #: The URL users reach the daemon at, when that is not the bind address (a proxy).
    public_url: str | None = None
    #: Host headers and browser origins allowed beyond loopback and same-origin.
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    keepalive_s: float = KEEPALIVE_S
    body_timeout_s: float = BODY_TIMEOUT_S
    #: Warm claude processes (SKYDECK_CLAUDE_WARM, _MAX, _IDLE_S).
    claude_warm: WarmConfig = field(default_factory=WarmConfig)

    def origin_policy(self) -> OriginPolicy:
        return OriginPolicy.build(
            bind_host=self.host,
            public_url=self.public_url,
            hosts=self.allowed_hosts,
            origins=self.allowed_origins,
        )

    def check(self) -> None:
        secured = bool(self.token or self.jwt_secret or self.jwks_url)
        if not is_loopback(self.host) and not secured and not self.insecure:
            raise ConfigError(
                f"refusing to listen on {self.host} without a token: anyone who can reach it "
                "could run agents. Set SKYDECK_TOKEN (or --token), SKYDECK_JWT_SECRET or "
                "SKYDECK_JWKS_URL, or pass --insecure."
            )


class Service:
    def __init__(self, settings: Settings, *, clock: WallClock | None = None) -> None:
        settings.check()
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.data_dir / DB_NAME)
        self.events = TurnEvents()
        workspaces = settings.data_dir / "workspaces"
        self.claude_bin = find_claude()
        self.metrics = Metrics(lambda: self.registry.depths())
        self.processes = ProcessRegistry(self.store)
        self.claude = ClaudeBackend(
            self.claude_bin,
            workspaces,
            on_retry=self.metrics.backend_retries.inc,
            processes=self.processes,
            warm=settings.claude_warm,
            on_warm_spawn=lambda reason: self.metrics.claude_warm_spawns.labels(reason).inc(),
            on_cold_fallback=lambda reason: self.metrics.claude_cold_fallbacks.labels(reason).inc(),
        )
        self.warm = self.claude.pool
        self.metrics.watch_claude_warm(lambda: self.warm.count if self.warm else 0)
        backends: dict[str, Backend] = {
            "echo": EchoBackend(),
            "command": CommandBackend(workspaces, self.processes),
            "claude": self.claude,
        }
        self.deps = TurnDeps(
            store=self.store,
            events=self.events,
            backends=backends,
            submit=lambda inbound: self.registry.submit(inbound),
            on_finished=self.metrics.on_finished,
            on_outbound_retry=self.metrics.outbound_retries.inc,
        )
        self.registry = Registry(
            self.store, self.deps, buffer_cap=settings.buffer_cap, max_turns=settings.max_turns
        )
        self.registry.on_accepted = self.metrics.on_accepted
        self.vault: VaultMirror | None = None
        if settings.vault_url:
            self.vault = VaultMirror(
                VaultClient(settings.vault_url, settings.vault_token), self.store
            )
            self.deps.mirror = self.vault
            self.metrics.watch_outbox(self.vault.pending)
        self.scheduler = Scheduler(
            self.store,
            self.registry.submit,
            clock,
            on_fire=lambda outcome: self.metrics.job_slots.labels(outcome).inc(),
        )
        self.sync: VaultSync | None = None
        if self.vault is not None:
            self.sync = VaultSync(
                self.vault.client,
                self.registry,
                self.vault,
                self.scheduler,
                poll_s=settings.vault_poll_s,
            )
        self.app = create_app(
            self.registry,
            self.store,
            Auth(settings.token, settings.jwt_secret, self._hub_keys()),
            self.metrics,
            self.scheduler,
            health_extra=self._health_extra,
            max_body=settings.max_body,
            body_timeout_s=settings.body_timeout_s,
            origins=settings.origin_policy(),
        )
        self._stopped = trio.Event()
        self._http_done = trio.Event()
        self.demo_note: str | None = None

    def _hub_keys(self) -> HubKeys | None:
        s = self.settings
        if not s.jwks_url:
            return None
        return HubKeys(s.jwks_url, s.jwt_issuer, ttl_s=s.jwks_ttl_s, refresh_s=s.jwks_refresh_s)

    def _ensure_demo(self) -> None:
        """First start with an empty store: a demo agent on channel `demo`.

        It uses claude when a CLI and credentials are there, else echo, so it
        always works; `demo_note` says which, for the startup banner.
        """
        if self.store.get_meta("initialized") is not None:
            return
        if self.settings.demo and not self.registry.agents():
            backend: Literal["claude", "echo"] = "echo"
            why = "no claude CLI with credentials found"
            if self.claude_bin and has_credentials():
                backend, why = "claude", f"claude CLI at {self.claude_bin}"
            self.registry.create(AgentSpec(name="demo", channel="demo", backend=backend))
            self.demo_note = f"created demo agent on channel demo: {backend} backend ({why})"
            log.info("created the demo agent", extra={"agent": "demo", "backend": backend})
        self.store.set_meta("initialized", "1")

    async def run(self, *, task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = [f"{self.settings.host}:{self.settings.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 5
        config.keep_alive_timeout = self.settings.keepalive_s
        try:
            # Before any message replays: a killed daemon's turns may still be running.
            await self.processes.kill_leftovers()
            async with trio.open_nursery() as nursery:
                if self.warm is not None:
                    await nursery.start(self.warm.run)
                registry_scope = trio.CancelScope()

                async def run_registry(task_status: TaskStatus[None]) -> None:
                    with registry_scope:
                        await self.registry.serve(task_status=task_status)

                await nursery.start(run_registry)
                self._ensure_demo()
                scheduler_scope = trio.CancelScope()

                async def run_scheduler(task_status: TaskStatus[None]) -> None:
                    with scheduler_scope:
                        await self.scheduler.run(task_status=task_status)

                await nursery.start(run_scheduler)
                if self.vault is not None and self.sync is not None:
                    await nursery.start(self.vault.run_outbox)
                    nursery.start_soon(self.sync.run)
                binds: list[str] = await nursery.start(
                    partial(
                        hypercorn_serve,
                        shielded_sends(self.app),
                        config,
                        shutdown_trigger=self._http_done.wait,
                    )
                )
                log.info("skydeck listening", extra={"binds": ",".join(binds)})
                task_status.started(binds)
                await self._stopped.wait()
                scheduler_scope.cancel()  # a slot due from now on fires at next start
                # R29, in order: (stopping: 503s already) -> running turns get the
                # grace period -> the rest is cancelled (replayed at next start) ->
                # only then does the HTTP server stop listening.
                await self.registry.drain(self.settings.grace_s)
                registry_scope.cancel()
                if self.warm is not None:
                    await self.warm.close()  # W16: no warm process outlives the daemon
                self._http_done.set()
        finally:
            self.store.close()

    def _health_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "claude_warm": self.warm.health()
            if self.warm is not None
            else {"max": 0, "idle_timeout_s": self.settings.claude_warm.idle_s, "processes": []}
        }
        if self.vault is None or self.sync is None:
            return extra
        return {
            **extra,
            "vault": {
                "url": self.vault.client.base_url,
                "outbox": self.vault.pending(),
                "definitions": len(self.vault.definitions),
                "problems": self.sync.health(),
            },
        }

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Begin the graceful shutdown (R29); `run` returns once it is complete."""
        log.info("stopping", extra={"grace_s": self.settings.grace_s})
        self.registry.accepting = False
        self.events.close_all()
        self._stopped.set()
