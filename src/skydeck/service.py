"""Wires the store, the registry and the HTTP app into one Trio nursery.

    Service.run
    ├── WarmPool.run           (warm claude processes, W2; closed after the registry, W16)
    ├── Registry.serve         (a task per registered channel, the store flusher)
    ├── Scheduler.run          (cron jobs: sleeps until the next due slot)
    ├── VaultMirror.run_outbox, VaultSync.run   (with --vault-url)
    └── hypercorn.trio.serve   (the HTTP app and /mcp/{channel}; its shutdown_trigger is ours)

`stop` is the one way down (R29): stop accepting (posts get 503), start no
new turn, give running turns a grace period, cancel the rest (their messages
stay `queued`/`working` in the store and replay at next start, R28), and only
then let Hypercorn stop listening.

One daemon per data dir: the first thing a `Service` does is take an exclusive
lock on ``<data dir>/skydeck.lock``; two daemons on one store would both replay
and run every open message. Whatever stops the start (the lock, a corrupt,
read-only or full store) is a `ConfigError`: one sentence naming the path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

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
from .errors import StoreFailure, unwrap
from .events import TurnEvents
from .guard import OriginPolicy, is_loopback
from .mcp.access import Sessions, TurnTokens
from .mcp.endpoint import McpEndpoint
from .mcp.tools import Toolbox
from .mcp.wiring import TurnTools, prepare_dir
from .metrics import Metrics
from .model import AgentSpec
from .pg import config as store_config
from .procs import ProcessRegistry
from .registry import DEFAULT_BUFFER_CAP, DEFAULT_MAX_TURNS, build_registry
from .sandbox import Sandbox, bwrap_path, parse_policy, probe
from .scheduler import CorrectedClock, Scheduler, SystemClock, WallClock
from .store import Store
from .store.sqlite import SQLiteStore
from .transports.base import Mirror, Mirrors
from .transports.telegram import Telegram, TelegramConfig, load_config
from .transports.telegram_store import TelegramStore
from .transports.vault import VaultClient, VaultMirror

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from .pg.hosting import PgHost
    from .pg.roles import Roles

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1941
DB_NAME = "skydeck.db"
LOCK_NAME = "skydeck.lock"
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


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold ``<data dir>/skydeck.lock`` exclusively for as long as the file stays open.

    `flock` belongs to the open file, so the kernel releases it when the process
    dies, however it dies: a lock file left by a killed daemon never blocks a
    start. The file is not inherited by agent processes (Python opens files
    non-inheritable), so an orphaned agent cannot hold it either. The pid in it
    is only for the message. Unbuffered, so a full disk fails the write itself.
    """
    path = data_dir / LOCK_NAME
    file = open(path, "a+b", buffering=0)  # noqa: SIM115 (held for the daemon's lifetime)
    try:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(
                f"another skydeck (pid {holder}) is already serving {data_dir}"
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n".encode())
    except OSError as exc:  # e.g. a full disk: name the file
        file.close()
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        file.close()
        raise
    return file


#: Setting -> the environment variables it is read from, first one set wins.
ENV: dict[str, tuple[str, ...]] = {
    "host": ("SKYDECK_HOST",),
    "port": ("SKYDECK_PORT", "PORT"),
    "data_dir": ("SKYDECK_DATA_DIR",),
    "token": ("SKYDECK_TOKEN",),
    "jwt_secret": ("SKYDECK_JWT_SECRET",),
    "jwks_url": ("SKYDECK_JWKS_URL",),
    "jwt_issuer": ("SKYDECK_JWT_ISSUER",),
    "max_turns": ("SKYDECK_MAX_TURNS",),
    "vault_url": ("SKYDECK_VAULT_URL",),
    "vault_token": ("SKYDECK_VAULT_TOKEN",),
    "vault_poll_s": ("SKYDECK_VAULT_POLL_S",),
    "public_url": ("SKYDECK_PUBLIC_URL",),
    "allowed_hosts": ("SKYDECK_ALLOWED_HOSTS",),
    "allowed_origins": ("SKYDECK_ALLOWED_ORIGINS",),
    "keepalive_s": ("SKYDECK_KEEPALIVE_S",),
    "body_timeout_s": ("SKYDECK_BODY_TIMEOUT_S",),
    "sandbox": ("SKYDECK_SANDBOX",),
    "bwrap": ("SKYDECK_BWRAP",),
    # Telegram (telegram.md §1): the token comes from the environment or a file, never a flag.
    "telegram_token": ("SKYDECK_TELEGRAM_TOKEN",),
    "telegram_api_url": ("SKYDECK_TELEGRAM_API_URL",),
    "telegram_mode": ("SKYDECK_TELEGRAM_MODE",),
    "telegram_webhook_url": ("SKYDECK_TELEGRAM_WEBHOOK_URL",),
    "telegram_webhook_secret": ("SKYDECK_TELEGRAM_WEBHOOK_SECRET",),
    "telegram_poll_timeout_s": ("SKYDECK_TELEGRAM_POLL_TIMEOUT_S",),
    "telegram_format": ("SKYDECK_TELEGRAM_FORMAT",),
    "telegram_pairing": ("SKYDECK_TELEGRAM_PAIRING",),
    "telegram_wait_s": ("SKYDECK_TELEGRAM_WAIT_S",),
    "telegram_misconfig_retry_s": ("SKYDECK_TELEGRAM_MISCONFIG_RETRY_S",),
    # Several hosts on one PostgreSQL (docs/multi-host.md, multi-host.md §1).
    "store_url": ("SKYDECK_STORE_URL",),
    "store_schema": ("SKYDECK_STORE_SCHEMA",),
    "host_id": ("SKYDECK_HOST_ID",),
    "advertise_url": ("SKYDECK_ADVERTISE_URL",),
    "lease_ttl_s": ("SKYDECK_LEASE_TTL_S",),
    "scan_interval_s": ("SKYDECK_SCAN_INTERVAL_S",),
    "max_channels": ("SKYDECK_MAX_CHANNELS",),
    "workspaces_shared": ("SKYDECK_WORKSPACES_SHARED",),
    "fast_failover": ("SKYDECK_FAST_FAILOVER",),
    "store_wait_s": ("SKYDECK_STORE_WAIT_S",),
    "store_pool": ("SKYDECK_STORE_POOL",),
}


def _parse_setting(name: str, kind: Any, raw: Any) -> Any:
    """A flag's or variable's value as the field's type; a bad number is a `ConfigError`."""
    if not isinstance(raw, str):
        return raw  # a flag argparse already typed
    kind = str(kind)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if kind == "Path":
        return Path(raw)
    if kind == "bool":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind.startswith("tuple"):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


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
    #: S3/S4: the sandbox policy for agents without their own, and bwrap's absolute path.
    sandbox: str = "auto"
    bwrap: str | None = None
    #: Telegram (telegram.md §1); no token: Telegram off. Never in a repr.
    telegram_token: str | None = field(default=None, repr=False)
    telegram_token_file: Path | None = None
    telegram_api_url: str | None = None
    telegram_mode: str | None = None
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    telegram_poll_timeout_s: float = 30.0
    telegram_format: str | None = None
    telegram_pairing: str | None = None
    telegram_wait_s: float = 10.0
    telegram_misconfig_retry_s: float = 60.0
    #: None: the embedded SQLite file; a postgres:// URL: one host of a cluster (§1).
    store_url: str | None = None
    store_schema: str = "skydeck"
    #: An R1 name; default ``<short hostname>-<port>``.
    host_id: str | None = None
    advertise_url: str | None = None
    lease_ttl_s: float = 10.0
    scan_interval_s: float = 1.0
    max_channels: int = 0
    workspaces_shared: bool = False
    fast_failover: bool = True
    store_wait_s: float = 0.0
    store_pool: int = 4
    migrate: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str], **flags: Any) -> Settings:
        """The settings of `skydeck serve`: a flag given (not None) wins, then the
        environment (`ENV`), then the field's default — every default is written
        once, on the field above. An empty variable counts as unset."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw: Any = flags.get(spec.name)
            if raw is None:
                raw = next((env[key] for key in ENV.get(spec.name, ()) if env.get(key)), None)
            if raw is None:
                continue
            values[spec.name] = _parse_setting(spec.name, spec.type, raw)
        if "claude_warm" not in values:
            try:
                values["claude_warm"] = WarmConfig.from_env(env)  # its three variables
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return cls(**values)

    def origin_policy(self) -> OriginPolicy:
        return OriginPolicy.build(
            bind_host=self.host,
            public_url=self.public_url,
            hosts=self.allowed_hosts,
            origins=self.allowed_origins,
        )

    def telegram(self) -> TelegramConfig | None:
        """T1/T3: the Telegram settings, checked (a bad one is a `ConfigError`)."""
        try:
            return load_config(
                token=self.telegram_token,
                token_file=str(self.telegram_token_file) if self.telegram_token_file else None,
                api_url=self.telegram_api_url,
                mode=self.telegram_mode,
                webhook_url=self.telegram_webhook_url,
                webhook_secret=self.telegram_webhook_secret,
                poll_timeout_s=self.telegram_poll_timeout_s,
                format=self.telegram_format,
                pairing=self.telegram_pairing,
                wait_s=self.telegram_wait_s,
                misconfig_retry_s=self.telegram_misconfig_retry_s,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check(self) -> None:
        try:
            parse_policy(self.sandbox)
            bwrap_path(self.bwrap)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            store_config.check(
                url=self.store_url,
                host_id=self.host_id,
                lease_ttl_s=self.lease_ttl_s,
                schema=self.store_schema,
            )
        except store_config.StoreConfigError as exc:
            raise ConfigError(str(exc)) from None
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
        self.telegram_config = settings.telegram()
        self.settings = settings
        #: One host of a PostgreSQL cluster (docs/multi-host.md), or None: SQLite.
        self.pg: PgHost | None = None
        self.db_path = settings.data_dir / DB_NAME
        if settings.store_url and store_config.store_kind(settings.store_url) == "sqlite":
            self.db_path = Path(store_config.sqlite_path(settings.store_url))
        with self._starting():
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_data_dir(settings.data_dir)  # before the store is opened
        try:
            with self._starting():
                self._open(clock)
        except BaseException:
            self._lock.close()
            raise

    @contextmanager
    def _starting(self) -> Iterator[None]:
        """Start-up failures as one `ConfigError` naming the path: a full, read-only
        or corrupt store is the operator's to fix, and a traceback does not help."""
        try:
            yield
        except BaseException as raised:
            exc = unwrap(raised)
            if isinstance(exc, ConfigError):
                raise exc from None
            said = self.pg.start_failure(exc) if self.pg is not None else None
            if said is not None:
                raise ConfigError(said) from None
            if isinstance(exc, OSError):
                where = exc.filename or self.settings.data_dir
                raise ConfigError(f"cannot use {where}: {exc.strerror or exc}") from None
            if isinstance(exc, StoreFailure):
                raise ConfigError(f"cannot write the store {self.db_path}: {exc.reason}") from None
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot open the store {self.db_path}: {exc}") from None
            raise

    def _open(self, clock: WallClock | None) -> None:
        settings = self.settings
        self.metrics = Metrics()
        if store_config.store_kind(settings.store_url) == "postgres":
            from .pg.hosting import PgHost  # psycopg only when it is asked for (P1)

            self.pg = PgHost.build(
                settings, self.metrics.registry, on_dropped=self.metrics.dropped.inc
            )
            self.store: Store = self.pg.store
        else:
            self.store = SQLiteStore(self.db_path, on_dropped=self.metrics.dropped.inc)
        # P25: on a cluster the hub also relays turn events between hosts.
        #: What `skydeck serve` exits with once `run` returns (3: too old for the store, P4).
        self.exit_code = 0
        self.events: TurnEvents = self.pg.events if self.pg is not None else TurnEvents()
        workspaces = settings.data_dir / "workspaces"
        self.claude_bin = find_claude()
        self.processes = ProcessRegistry(self.store)
        self.sandbox = self._sandbox()
        self.claude = ClaudeBackend(
            self.claude_bin,
            workspaces,
            on_retry=self.metrics.backend_retries.inc,
            processes=self.processes,
            warm=settings.claude_warm,
            on_warm_spawn=lambda reason: self.metrics.claude_warm_spawns.labels(reason).inc(),
            on_cold_fallback=lambda reason: self.metrics.claude_cold_fallbacks.labels(reason).inc(),
            sandbox=self.sandbox,
        )
        self.warm = self.claude.pool
        self.metrics.watch_claude_warm(lambda: self.warm.count if self.warm else 0)
        backends: dict[str, Backend] = {
            "echo": EchoBackend(),
            "command": CommandBackend(workspaces, self.processes, self.sandbox),
            "claude": self.claude,
        }
        self.vault: VaultMirror | None = None
        if settings.vault_url:
            self.vault = VaultMirror(
                VaultClient(settings.vault_url, settings.vault_token), self.store
            )
            self.metrics.watch_outbox(self.vault.pending)
        # mcp.md: turn tokens and sessions live in memory only; the config files of
        # a killed daemon's turns are removed here (M9).
        tokens, sessions = TurnTokens(), Sessions()
        prepare_dir(settings.data_dir / "mcp")
        self.turn_tools = TurnTools(
            tokens, sessions, settings.data_dir / "mcp", sandboxed_base=self.sandbox.mcp_base
        )
        # Telegram's rows (links, update ids, its outbox) live in the embedded
        # engine's group commit; a shared PostgreSQL store has no Telegram tables yet.
        self.telegram_rows = (
            TelegramStore(self.store) if isinstance(self.store, SQLiteStore) else None
        )
        self.telegram: Telegram | None = None
        if self.telegram_config is not None and self.telegram_rows is None:
            raise ConfigError(
                "Telegram runs on the embedded SQLite store only for now; unset "
                "SKYDECK_TELEGRAM_TOKEN or serve without --store postgres://"
            )
        if self.telegram_config is not None and self.telegram_rows is not None:
            self.telegram = Telegram(
                self.store, self.telegram_rows, self.telegram_config, self.metrics.registry
            )
        telegram_mirror = self.telegram.mirror if self.telegram is not None else None
        mirrors: list[Mirror] = [m for m in (self.vault, telegram_mirror) if m is not None]
        mirror = mirrors[0] if len(mirrors) == 1 else Mirrors(*mirrors) if mirrors else None
        self.registry = build_registry(
            self.store,
            backends,
            events=self.events,
            mirror=mirror,
            metrics=self.metrics,
            buffer_cap=settings.buffer_cap,
            max_turns=settings.max_turns,
            clustered=self.pg is not None,
            sandbox_mode=self._sandbox_mode,
            tools=self.turn_tools,
        )
        if self.pg is not None:
            self.pg.attach(self.registry, self.metrics.registry)
        self.deps = self.registry.deps
        self.telegram_receiver = (
            self.telegram.receive_with(self.registry) if self.telegram is not None else None
        )
        self.metrics.watch_queues(self.registry.depths)
        if clock is None and self.pg is not None:  # P23: slots on the database clock
            ownership = self.pg.store.ownership
            clock = CorrectedClock(SystemClock(), lambda: ownership.clock_offset_s)
        self.scheduler = Scheduler(
            self.store,
            self.registry,
            clock,
            on_fire=lambda outcome: self.metrics.job_slots.labels(outcome).inc(),
            shared=self.pg is not None,
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
        #: P17: on several hosts the scheduler and the vault's tasks run where
        #: their role is held; None: they run here (SQLite).
        self.roles: Roles | None = None
        if self.pg is not None and self.pg.cluster is not None:
            from .pg import roles

            self.roles = roles.attach(self.pg.cluster, self.scheduler, self.vault, self.sync)
        auth = Auth(settings.token, settings.jwt_secret, self._hub_keys())
        toolbox = Toolbox(
            self.registry, self.store, self.events, self.scheduler, on_call=self.metrics.on_mcp_call
        )
        self.metrics.watch_mcp_sessions(lambda: len(sessions))
        self.app = create_app(
            self.registry,
            self.store,
            auth,
            self.metrics,
            self.scheduler,
            health_extra=self._health_extra,
            cluster_view=self.pg.view if self.pg is not None else None,
            agent_owners=self.pg.owners if self.pg is not None else None,
            max_body=settings.max_body,
            body_timeout_s=settings.body_timeout_s,
            origins=settings.origin_policy(),
            sandbox=self.sandbox,
            mcp=McpEndpoint(toolbox, auth, tokens=tokens, sessions=sessions),
            telegram=(self.telegram_rows, self.telegram_receiver)
            if self.telegram_rows is not None
            else None,
        )
        self._stopped = trio.Event()
        self._http_done = trio.Event()
        self.demo_note: str | None = None

    def _sandbox(self) -> Sandbox:
        """S3-S5: the policy, and the probe, once, before any turn (replays included)."""
        policy = parse_policy(self.settings.sandbox)
        found = probe(bwrap_path(self.settings.bwrap))
        if policy == "required" and not found.available:
            raise ConfigError(f"refusing to start: --sandbox required, but {found.reason}")
        sandbox = Sandbox(
            policy,
            found,
            data_dir=self.settings.data_dir,
            on_denied=lambda agent, _: self.metrics.sandbox_egress_denied.labels(agent).inc(),
            await_listener=True,
        )
        self.metrics.watch_sandboxes(lambda: sandbox.running)
        if not found.available:
            log.warning(sandbox.banner())
        return sandbox

    def _sandbox_mode(self, agent: AgentSpec) -> str:
        """S23: echo runs no process; the others run in their effective mode."""
        return "off" if agent.backend == "echo" else self.sandbox.effective(agent)

    def _hub_keys(self) -> HubKeys | None:
        s = self.settings
        if not s.jwks_url:
            return None
        return HubKeys(s.jwks_url, s.jwt_issuer, ttl_s=s.jwks_ttl_s, refresh_s=s.jwks_refresh_s)

    async def _ensure_demo(self) -> None:
        """First start with an empty store: a demo agent on channel `demo`.

        It uses claude when a CLI and credentials are there, else echo, so it
        always works; `demo_note` says which, for the startup banner.
        """
        if self.pg is not None:
            if not await self.pg.store.init_once("demo"):  # once per store, not per host (P4)
                return
        elif await self.store.get_meta("initialized") is not None:
            return
        if self.settings.demo and not self.registry.agents():
            backend: Literal["claude", "echo"] = "echo"
            why = "no claude CLI with credentials found"
            if self.claude_bin and has_credentials():
                backend, why = "claude", f"claude CLI at {self.claude_bin}"
            await self.registry.create(AgentSpec(name="demo", channel="demo", backend=backend))
            self.demo_note = f"created demo agent on channel demo: {backend} backend ({why})"
            log.info("created the demo agent", extra={"agent": "demo", "backend": backend})
        await self.store.set_meta("initialized", "1")

    async def run(self, *, task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = [f"{self.settings.host}:{self.settings.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 5
        config.keep_alive_timeout = self.settings.keepalive_s
        try:
            if self.pg is not None:
                with self._starting():  # P5: HTTP is bound only after joining
                    await self.pg.open()
            # Before any message replays: a killed daemon's turns may still be running.
            await self.processes.kill_leftovers()
            async with trio.open_nursery() as nursery:
                if self.warm is not None:
                    await nursery.start(self.warm.run)
                registry_scope = trio.CancelScope()

                async def run_registry(task_status: TaskStatus[None]) -> None:
                    with registry_scope:
                        await self.registry.serve(task_status=task_status)

                if self.telegram is not None:
                    await self.telegram.mirror.recover()  # T38: before any turn replays
                with self._starting():  # the stored agents are read and replayed here
                    await nursery.start(run_registry)
                    await self._ensure_demo()
                cluster_scope = trio.CancelScope()
                scheduler_scope = trio.CancelScope()
                if self.roles is not None:
                    roles = self.roles

                    async def run_roles(task_status: TaskStatus[None]) -> None:
                        with scheduler_scope:
                            await roles.run(task_status=task_status)

                    await self.scheduler.load()  # the API's view; the holder fires (P23)
                    await nursery.start(run_roles)  # before the first claim
                if self.pg is not None and self.pg.cluster is not None:
                    cluster = self.pg.cluster

                    pg = self.pg

                    async def run_cluster(task_status: TaskStatus[None]) -> None:
                        with cluster_scope:
                            async with trio.open_nursery() as loops:
                                loops.start_soon(pg.watch_compatibility, self._too_old)
                                await loops.start(cluster.run)
                                task_status.started()

                    await nursery.start(run_cluster)

                async def run_scheduler(task_status: TaskStatus[None]) -> None:
                    with scheduler_scope:
                        await self.scheduler.run(task_status=task_status)

                if self.roles is None:
                    await nursery.start(run_scheduler)
                telegram_scope = trio.CancelScope()
                if self.telegram is not None:
                    telegram = self.telegram

                    async def run_telegram(task_status: TaskStatus[None]) -> None:
                        with telegram_scope:
                            await telegram.run(task_status=task_status)

                    await nursery.start(run_telegram)
                if self.vault is not None and self.sync is not None and self.roles is None:
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
                self.sandbox.listening(binds[0])  # before any turn waiting for the address
                self.turn_tools.listening(binds)
                log.info("skydeck listening", extra={"binds": ",".join(binds)})
                task_status.started(binds)
                await self._stopped.wait()
                if self.pg is not None and self.pg.cluster is not None:
                    await self.pg.cluster.release_roles()  # P14: another host takes them
                scheduler_scope.cancel()  # a slot due from now on fires at next start
                # R29, in order: (stopping: 503s already) -> running turns get the
                # grace period -> the rest is cancelled (replayed at next start) ->
                # only then does the HTTP server stop listening.
                await self.registry.drain(self.settings.grace_s)
                registry_scope.cancel()
                telegram_scope.cancel()  # T38: pending rows go at next start
                cluster_scope.cancel()  # heartbeats ran through the grace period
                if self.pg is not None and self.pg.cluster is not None:
                    await self.pg.cluster.leave()  # P14: only after every turn stopped
                if self.warm is not None:
                    await self.warm.close()  # W16: no warm process outlives the daemon
                self._http_done.set()
        finally:
            with trio.CancelScope(shield=True):
                await self.sandbox.aclose()
            self.store.close()
            self._lock.close()

    async def _health_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = await self.pg.health() if self.pg is not None else {}
        extra |= {
            "sandbox": self.sandbox.health(),
            "claude_warm": self.warm.health()
            if self.warm is not None
            else {"max": 0, "idle_timeout_s": self.settings.claude_warm.idle_s, "processes": []},
        }
        if self.telegram is not None:
            extra["telegram"] = self.telegram.health_block()
        if self.vault is None or self.sync is None:
            return extra
        return {
            **extra,
            "vault": {
                "url": self.vault.client.base_url,
                "outbox": await self.vault.pending(),
                "definitions": len(self.vault.definitions),
                "problems": self.sync.health(),
            },
        }

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def _too_old(self, reason: str) -> None:
        """P4: a newer skydeck raised the store's `min_compatible` past this
        version: drain as for SIGTERM (R29), then exit 3."""
        log.error("this skydeck is too old for the store; stopping", extra={"reason": reason})
        self.exit_code = 3
        self.stop()

    def stop(self) -> None:
        """Begin the graceful shutdown (R29); `run` returns once it is complete."""
        log.info("stopping", extra={"grace_s": self.settings.grace_s})
        self.registry.stop_accepting()
        if self.telegram_receiver is not None:
            self.telegram_receiver.stop()  # T38: no getUpdates or webhook update from now on
        self.events.close_all()
        self._stopped.set()
