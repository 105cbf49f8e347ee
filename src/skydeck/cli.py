"""The ``skydeck`` command: ``serve`` runs the daemon; everything else talks to a
running daemon over HTTP (httpx), so the CLI sees exactly what any client sees.

Errors are one readable line: exit 1 for an error the daemon reported, exit 2
when the daemon cannot be reached (with how to start it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import trio

from . import __version__, cli_telegram
from .ledger import TERMINAL_STATES, MessageState
from .model import BACKENDS, MODES, QUEUE_MODES, SANDBOX_MODES, EventKind
from .pg import config as store_config

if TYPE_CHECKING:
    from trio_typing import TaskStatus

DEFAULT_URL = "http://127.0.0.1:1941"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- the HTTP side ------------------------------------------------------------------


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.TransportError:
            self._unreachable()
        return self._decode(response)

    def _unreachable(self) -> NoReturn:
        raise CliError(
            f"cannot reach the skydeck daemon at {self.url}; start it with `skydeck serve`",
            code=2,
        )

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success:
            return data
        if isinstance(data, dict) and "error" in data:
            field = f" (field: {data['field']})" if data.get("field") else ""
            raise CliError(f"{data['error']}{field}")
        raise CliError(f"the daemon answered HTTP {response.status_code}")

    def events(self, channel: str) -> Iterator[dict[str, Any] | None]:
        """Turn events of ``channel``; yields None once, when the subscription is live."""
        try:
            with self.http.stream(
                "GET", f"/api/channels/{channel}/turn-events", timeout=httpx.Timeout(30, read=None)
            ) as response:
                if not response.is_success:
                    response.read()
                    self._decode(response)
                for line in response.iter_lines():
                    if line.startswith(": subscribed"):
                        yield None
                    elif line.startswith("data: "):
                        yield json.loads(line[len("data: ") :])
        except httpx.TransportError:
            self._unreachable()


# -- commands -----------------------------------------------------------------------


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _list(
    items: list[dict[str, Any]],
    as_json: bool,
    empty_hint: str,
    line: Callable[[dict[str, Any]], str],
) -> None:
    """A `ls` command: raw JSON, a hint when there is nothing, or one line per item."""
    if as_json:
        _print_json(items)
    elif not items:
        print(empty_hint)
    else:
        for item in items:
            print(line(item))


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs
    from .errors import unwrap
    from .service import ConfigError, Service, Settings

    logs.configure(os.environ.get("SKYDECK_LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env(
            os.environ,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            token=args.token,
            grace_s=args.grace,
            vault_url=args.vault_url,
            vault_token=args.vault_token,
            vault_poll_s=args.vault_poll,
            demo=args.demo,
            insecure=args.insecure,
            max_turns=args.max_turns,
            public_url=args.public_url,
            sandbox=args.sandbox,
            telegram_token_file=args.telegram_token_file,
            telegram_mode=args.telegram_mode,
            telegram_webhook_url=args.telegram_webhook_url,
            **store_config.flag_values(args),
        )
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None
    try:
        service = Service(settings)
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def run_service(task_status: TaskStatus[list[str]]) -> None:
                await service.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop watching for signals

            nursery.start_soon(watch_signals, nursery.cancel_scope)
            binds: list[str] = await nursery.start(run_service)
            base = binds[0]
            print(f"skydeck {__version__} serving data in {settings.data_dir}", flush=True)
            print(f"  web UI: {base}/", flush=True)
            print(f"  API:    {base}/api  (health: {base}/health)", flush=True)
            print(f"  {service.sandbox.banner()}", flush=True)
            if service.demo_note:
                print(f"  {service.demo_note}", flush=True)

    async def watch_signals(everything: trio.CancelScope) -> None:
        """First SIGINT/SIGTERM: graceful stop (R29). A second one: stop at once."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if service.stopping:
                    print("skydeck: second signal, stopping now", file=sys.stderr, flush=True)
                    everything.cancel()
                    return
                print(
                    f"skydeck: stopping; running turns get {settings.grace_s:g} s "
                    "(a second Ctrl-C stops at once)",
                    file=sys.stderr,
                    flush=True,
                )
                service.stop()

    try:
        trio.run(main)
    except BaseException as raised:
        failure = unwrap(raised)
        if isinstance(failure, ConfigError):  # the start failed: one line, no traceback (D8)
            raise CliError(str(failure), code=2) from None
        raise
    return service.exit_code


def cmd_agent(args: argparse.Namespace, client: Client) -> int:
    if args.agent_cmd == "add":
        body: dict[str, Any] = {"name": args.name, "channel": args.channel}
        for key in ("backend", "mode", "queue_mode", "model"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.system_prompt_file is not None:
            body["system_prompt"] = Path(args.system_prompt_file).read_text()
        elif args.system_prompt is not None:
            body["system_prompt"] = args.system_prompt
        if args.command is not None:
            body["command"] = shlex.split(args.command)
        if args.timeout is not None:
            body["timeout_s"] = args.timeout
        if args.max_reply_bytes is not None:
            body["max_reply_bytes"] = args.max_reply_bytes
        if args.env:
            body["env"] = dict(item.split("=", 1) for item in args.env)
        if args.sandbox is not None:
            body["sandbox"] = args.sandbox
        if args.egress:
            body["egress"] = args.egress
        if args.no_mcp:
            body["mcp"] = False
        if args.mcp_allow is not None:
            body["mcp_allow"] = [ch.strip() for ch in args.mcp_allow.split(",") if ch.strip()]
        agent = client.request("POST", "/api/agents", body)
        print(f"added agent {agent['name']} on channel {agent['channel']} ({agent['backend']})")
        _warn_if_unavailable(client, agent)
    elif args.agent_cmd == "ls":

        def agent_line(agent: dict[str, Any]) -> str:
            status = agent["status"] + (f" {agent['queued']}" if agent["queued"] else "")
            return f"{agent['name']:<20} {agent['channel']:<20} {agent['backend']:<8} {status}"

        _list(
            client.request("GET", "/api/agents")["agents"],
            args.json,
            "no agents; add one with `skydeck agent add NAME --channel CH`",
            agent_line,
        )
    elif args.agent_cmd == "show":
        agent = client.request("GET", f"/api/agents/{args.name}")
        if args.json:
            _print_json(agent)
        else:
            for key, value in agent.items():
                print(f"{key:<14} {value if value is not None else '-'}")
    elif args.agent_cmd == "rm":
        client.request("DELETE", f"/api/agents/{args.name}")
        print(f"removed agent {args.name}")
    elif args.agent_cmd == "reset":
        client.request("POST", f"/api/agents/{args.name}/reset")
        print(f"reset the session of agent {args.name}")
    return 0


def _warn_if_unavailable(client: Client, agent: dict[str, Any]) -> None:
    """One stderr line when the daemon says it cannot run the new agent's backend.

    The agent is created all the same (claude is the default, and its CLI may
    be installed later); the hint names the backends that do run. `GET /api`
    reports them; a daemon that does not is taken to run everything.
    """
    try:
        backends = client.request("GET", "/api").get("backends", {})
    except CliError:
        return  # only a hint: the agent exists, do not fail the command over it
    if backends.get(agent["backend"], True):
        return
    available = ", ".join(name for name, runs in backends.items() if runs)
    print(
        f"skydeck: warning: the daemon cannot run the {agent['backend']} backend, so the turns "
        f"of agent {agent['name']} fail until it can; it runs {available} (choose with --backend)",
        file=sys.stderr,
    )


def cmd_job(args: argparse.Namespace, client: Client) -> int:
    if args.job_cmd == "add":
        body = {
            "name": args.name,
            "channel": args.channel,
            "schedule": args.schedule,
            "content": args.content,
            "timezone": args.timezone,
        }
        job = client.request("POST", "/api/jobs", body)
        print(f"added job {job['name']}: next run {job['next_run_at']}")
    elif args.job_cmd == "ls":

        def job_line(job: dict[str, Any]) -> str:
            state = "" if job["enabled"] else " (disabled)"
            return (
                f"{job['name']:<20} {job['channel']:<16} {job['schedule']:<16} "
                f"next {job['next_run_at'] or '-'}  last {job['last_outcome'] or '-'}{state}"
            )

        _list(
            client.request("GET", "/api/jobs")["jobs"],
            args.json,
            "no jobs; add one with `skydeck job add NAME --channel CH --schedule ...`",
            job_line,
        )
    elif args.job_cmd == "rm":
        client.request("DELETE", f"/api/jobs/{args.name}")
        print(f"removed job {args.name}")
    elif args.job_cmd == "run":
        ack = client.request("POST", f"/api/jobs/{args.name}/run")
        print(f"{ack['state']} {ack['id']}")
    return 0


def cmd_send(args: argparse.Namespace, client: Client) -> int:
    path = f"/api/channels/{args.channel}/messages"
    if not args.wait:
        ack = client.request("POST", path, {"content": args.text})
        print(f"{ack['state']} {ack['id']}")  # stdout stays `<state> <id>` for scripts
        if ack["state"] == MessageState.BUFFERED:
            print(
                f"no agent serves channel {args.channel} yet; it runs when one registers",
                file=sys.stderr,
            )
        return 0
    events = client.events(args.channel)
    next(events)  # subscribed: no event of our turn can be missed from here on
    ack = client.request("POST", path, {"content": args.text})
    if ack["state"] == MessageState.BUFFERED:
        print(
            f"no agent serves channel {args.channel} yet; the message is kept ({ack['id']})",
            file=sys.stderr,
        )
        return 0
    message = client.request("GET", f"/api/messages/{ack['id']}")
    if message["state"] in TERMINAL_STATES:
        return _print_outcome(client, message)
    for event in events:
        if event is None or event.get("message_id") != ack["id"]:
            continue
        if event["kind"] == EventKind.DONE:
            if event.get("reply"):
                print(event["reply"])
            return 0
        if event["kind"] == EventKind.ERROR and not event.get("retrying"):
            # P15: a retrying error closes a dead host's partial reply; the rerun's
            # own end comes later.
            print(f"skydeck: turn failed: {event['error']}", file=sys.stderr)
            return 1
    raise CliError("the daemon closed the event stream before the turn ended")


def _print_outcome(client: Client, message: dict[str, Any]) -> int:
    if message["state"] == MessageState.DONE:
        if message.get("reply_id"):
            print(client.request("GET", f"/api/messages/{message['reply_id']}")["content"])
        return 0
    print(f"skydeck: turn {message['state']}: {message.get('error')}", file=sys.stderr)
    return 1


def cmd_tail(args: argparse.Namespace, client: Client) -> int:
    for event in client.events(args.channel):
        if event is not None:
            print(json.dumps(event, ensure_ascii=False), flush=True)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """P4: migrate a PostgreSQL store without serving it (what --no-migrate points to)."""
    try:
        kind = store_config.store_kind(args.store_url)
    except store_config.StoreConfigError as exc:
        raise CliError(str(exc), code=2) from None
    if kind != "postgres":
        raise CliError("skydeck migrate needs --store postgres://... (or SKYDECK_STORE_URL)")
    import psycopg

    from .pg import schema
    from .pg.driver import describe, redact

    try:
        with psycopg.connect(args.store_url, connect_timeout=5) as conn:
            done = schema.migrate(conn, args.store_schema)
    except psycopg.OperationalError as exc:
        raise CliError(
            f"cannot reach the store at {redact(args.store_url)}: {describe(exc)}", code=2
        ) from None
    except schema.SchemaError as exc:
        raise CliError(str(exc), code=2) from None
    if done.before == done.after:
        print(f"store is at schema version {done.after}; nothing to do")
    else:
        print(f"store migrated from {done.before} to {done.after}")
    return 0


def cmd_cluster(client: Client) -> int:
    """P28: the hosts of a cluster and what they own."""
    view = client.request("GET", "/api/cluster")
    for host in view["hosts"]:
        state = "alive" if host["alive"] else "gone"
        print(
            f"{host['id']:<20} {state:<6} incarnation {host['incarnation']:<6} "
            f"owns {host['owned']:<5} heartbeat {host['heartbeat_age_s']:.1f} s ago  "
            f"{host['url'] or ''}"
        )
    channels = view["channels"]
    print(f"channels: {channels['owned']} owned, {channels['unowned']} unowned")
    return 0


# -- parsing ------------------------------------------------------------------------

DESCRIPTION = """\
skydeck runs AI coding agents behind chat channels.

"skydeck serve" starts the daemon; every other command talks to a running
daemon over HTTP (--url)."""

EXAMPLES = """\
examples:
  skydeck serve
  skydeck agent add shout --channel shout --backend command --command "tr a-z A-Z"
  skydeck send shout "make this loud" --wait

"skydeck COMMAND --help" explains a command and shows an example."""


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    *examples: str,
) -> argparse.ArgumentParser:
    """A subcommand: ``help`` for its line in the parent's list, ``examples`` under its own help."""
    return commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="example:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _actions(
    parser: argparse.ArgumentParser, title: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return parser.add_subparsers(dest=title, required=True, metavar="ACTION", title="actions")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skydeck",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skydeck {__version__}")
    parser.add_argument(
        "--url",
        default=os.environ.get("SKYDECK_URL", DEFAULT_URL),
        help=f"the daemon to talk to (default {DEFAULT_URL}, env SKYDECK_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SKYDECK_TOKEN"),
        help="bearer token, when the daemon needs one (env SKYDECK_TOKEN)",
    )
    commands = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND", title="commands")

    serve = _command(
        commands,
        "serve",
        "run the daemon (HTTP API, web UI and the agents)",
        "skydeck serve --port 8080 --data-dir ./skydeck-data",
        "SKYDECK_TOKEN=s3cret skydeck serve --host 0.0.0.0",
    )
    serve.epilog = (
        f"{serve.epilog}\n\n"
        "set in the environment only: SKYDECK_JWT_SECRET (HS256 JWTs), SKYDECK_JWKS_URL and\n"
        "SKYDECK_JWT_ISSUER (Parachute hub tokens), SKYDECK_CLAUDE_BIN, SKYDECK_LOG_LEVEL,\n"
        "SKYDECK_CLAUDE_WARM (on/off), SKYDECK_CLAUDE_WARM_MAX, SKYDECK_CLAUDE_WARM_IDLE_S"
    )
    store_config.add_flags(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1, env SKYDECK_HOST)")
    serve.add_argument("--port", type=int, help="port (default 1941, env SKYDECK_PORT or PORT)")
    serve.add_argument(
        "--data-dir", metavar="DIR", help="where the SQLite store lives (env SKYDECK_DATA_DIR)"
    )
    serve.add_argument(
        "--token",
        metavar="TOKEN",
        dest="serve_token",
        help="bearer token clients must send (env SKYDECK_TOKEN)",
    )
    serve.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on first start, create a demo agent on channel demo (default; --no-demo: none)",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without any token"
    )
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="the URL users reach the daemon at behind a proxy; its host and origin are "
        "allowed (env SKYDECK_PUBLIC_URL)",
    )
    serve.add_argument(
        "--max-turns",
        metavar="N",
        type=int,
        help="turns running at once across channels (default 4)",
    )
    serve.add_argument(
        "--grace",
        metavar="SECONDS",
        type=float,
        help="seconds running turns get at shutdown (default 30)",
    )
    serve.add_argument(
        "--sandbox",
        metavar="POLICY",
        help="auto (default: workspace where bwrap works), off, workspace, strict or required: "
        "the bubblewrap sandbox of agents without their own (env SKYDECK_SANDBOX)",
    )
    serve.add_argument(
        "--vault-url", metavar="URL", help="Parachute Vault URL (env SKYDECK_VAULT_URL)"
    )
    serve.add_argument(
        "--vault-token", metavar="TOKEN", help="vault token (env SKYDECK_VAULT_TOKEN)"
    )
    serve.add_argument(
        "--vault-poll",
        metavar="SECONDS",
        type=float,
        help="seconds between vault definition polls (default 60)",
    )

    serve.add_argument(
        "--telegram-token-file",
        metavar="PATH",
        help="Telegram bot token, first line of this file (env SKYDECK_TELEGRAM_TOKEN; "
        "never as a flag: argv is readable by every local user)",
    )
    serve.add_argument(
        "--telegram-mode",
        choices=("polling", "webhook"),
        help="how updates arrive (default polling, env SKYDECK_TELEGRAM_MODE)",
    )
    serve.add_argument(
        "--telegram-webhook-url",
        metavar="URL",
        help="public HTTPS URL of /api/telegram/webhook (env SKYDECK_TELEGRAM_WEBHOOK_URL)",
    )

    agent = _command(
        commands,
        "agent",
        "add, list, show, remove or reset agents",
        "skydeck agent add shout --channel shout --backend command --command 'tr a-z A-Z'",
        "skydeck agent ls",
    )
    agent_cmds = _actions(agent, "agent_cmd")
    add = _command(
        agent_cmds,
        "add",
        "create an agent that serves a channel",
        "skydeck agent add shout --channel shout --backend command --command 'tr a-z A-Z'",
        "skydeck agent add reviewer --channel review --model sonnet --system-prompt-file review.md",
    )
    add.add_argument("name", help="agent name: letters, digits, '.', '_' or '-'")
    add.add_argument(
        "--channel", metavar="CH", required=True, help="the channel it serves (one agent each)"
    )
    add.add_argument(
        "--backend",
        choices=BACKENDS,
        help="what runs a turn: claude (default; the Claude Code CLI), command or echo",
    )
    add.add_argument(
        "--mode",
        choices=MODES,
        help="single-threaded (default: one conversation, resumed) or multi-threaded",
    )
    add.add_argument(
        "--queue-mode",
        choices=QUEUE_MODES,
        help="messages during a turn: followup (default), collect or interrupt",
    )
    add.add_argument("--model", help="the claude model, e.g. sonnet")
    prompt = add.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", metavar="TEXT", help="system prompt text")
    prompt.add_argument(
        "--system-prompt-file", metavar="FILE", help="read the system prompt from this file"
    )
    add.add_argument(
        "--command",
        metavar="'PROG ARG...'",
        help='command backend: the program, split like a shell: "prog arg ..."',
    )
    add.add_argument(
        "--timeout", metavar="SECONDS", type=int, help="turn timeout in seconds (default 900)"
    )
    add.add_argument(
        "--max-reply-bytes",
        metavar="BYTES",
        type=int,
        help="longer replies are cut (default 1048576 = 1 MiB)",
    )
    add.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the backend (repeatable)",
    )
    add.add_argument(
        "--sandbox",
        choices=SANDBOX_MODES,
        help="its bubblewrap sandbox: off, workspace or strict (default: the daemon's)",
    )
    add.add_argument(
        "--egress",
        action="append",
        metavar="HOST:PORT",
        help="a host a workspace sandbox may reach besides the model API (repeatable)",
    )
    add.add_argument(
        "--no-mcp",
        action="store_true",
        help="no skydeck MCP tools in its turns (docs/mcp.md)",
    )
    add.add_argument(
        "--mcp-allow",
        metavar="CH,CH",
        help="the other channels its MCP tools may reach (default: all; '' for none)",
    )
    agent_ls = _command(agent_cmds, "ls", "list agents with their status", "skydeck agent ls")
    agent_ls.add_argument("--json", action="store_true", help="print raw JSON")
    show = _command(agent_cmds, "show", "show one agent's settings", "skydeck agent show shout")
    show.add_argument("name", help="agent name")
    show.add_argument("--json", action="store_true", help="print raw JSON")
    rm = _command(
        agent_cmds,
        "rm",
        "remove an agent (its channel's waiting messages are kept, buffered)",
        "skydeck agent rm shout",
    )
    rm.add_argument("name", help="agent name")
    reset = _command(
        agent_cmds,
        "reset",
        "forget an agent's session: its next turn starts a new conversation",
        "skydeck agent reset shout",
    )
    reset.add_argument("name", help="agent name")

    standup = (
        'skydeck job add standup --channel demo --schedule "0 9 * * 1-5" '
        "--content standup --timezone Europe/Berlin"
    )
    job = _command(commands, "job", "add, list, run or remove cron jobs", standup, "skydeck job ls")
    job_cmds = _actions(job, "job_cmd")
    job_add = _command(job_cmds, "add", "create a job that posts a message on a schedule", standup)
    job_add.add_argument("name", help="job name: letters, digits, '.', '_' or '-'")
    job_add.add_argument(
        "--channel", metavar="CH", required=True, help="the channel each run posts to"
    )
    job_add.add_argument(
        "--schedule", metavar="CRON", required=True, help='5-field cron, e.g. "*/5 * * * *"'
    )
    job_add.add_argument(
        "--content", metavar="TEXT", required=True, help="the message each run posts"
    )
    job_add.add_argument(
        "--timezone", metavar="ZONE", default="UTC", help="IANA zone (default UTC)"
    )
    job_ls = _command(job_cmds, "ls", "list jobs with their next and last run", "skydeck job ls")
    job_ls.add_argument("--json", action="store_true", help="print raw JSON")
    job_rm = _command(job_cmds, "rm", "remove a job", "skydeck job rm standup")
    job_rm.add_argument("name", help="job name")
    job_run = _command(
        job_cmds, "run", "post a job's message now, outside its schedule", "skydeck job run standup"
    )
    job_run.add_argument("name", help="job name")

    send = _command(
        commands,
        "send",
        "post a message to a channel",
        'skydeck send shout "make this loud" --wait',
        'skydeck send demo "hello"',
    )
    send.add_argument("channel", help="the channel to post to")
    send.add_argument("text", help="the message")
    send.add_argument("--wait", action="store_true", help="wait for the turn, print the reply")

    tail = _command(
        commands,
        "tail",
        "print a channel's turn events as they come (JSON lines)",
        "skydeck tail shout",
    )
    tail.add_argument("channel", help="the channel to follow")
    cli_telegram.add_parser(commands)

    migrate = _command(
        commands,
        "migrate",
        "bring a PostgreSQL store's schema to this version, then exit",
        "skydeck migrate --store postgres://skydeck@db.internal/skydeck",
    )
    migrate.add_argument(
        "--store",
        dest="store_url",
        metavar="URL",
        default=os.environ.get("SKYDECK_STORE_URL"),
        help="the store (env SKYDECK_STORE_URL)",
    )
    migrate.add_argument(
        "--store-schema",
        metavar="NAME",
        default=os.environ.get("SKYDECK_STORE_SCHEMA") or "skydeck",
        help="default skydeck",
    )
    _command(
        commands,
        "cluster",
        "show the hosts sharing the daemon's PostgreSQL store, and what each owns",
        "skydeck cluster",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            if args.serve_token:
                args.token = args.serve_token
            return cmd_serve(args)
        if args.cmd == "migrate":
            return cmd_migrate(args)
        client = Client(args.url, args.token)
        if args.cmd == "cluster":
            return cmd_cluster(client)
        if args.cmd == "agent":
            return cmd_agent(args, client)
        if args.cmd == "send":
            return cmd_send(args, client)
        if args.cmd == "job":
            return cmd_job(args, client)
        if args.cmd == "telegram":
            return cli_telegram.run(args, client)
        return cmd_tail(args, client)
    except CliError as exc:
        print(f"skydeck: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
