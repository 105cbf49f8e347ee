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

from . import __version__
from .model import BACKENDS, MODES, QUEUE_MODES

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


def _first(flag: Any, env: str | None, env2: str | None, default: Any, kind: Any) -> Any:
    """The flag if given (0 is a value: `--port 0` picks a free port), else the
    environment, else the default."""
    for value in (flag, env or None, env2 or None):
        if value is not None:
            try:
                return kind(value)
            except ValueError:
                raise CliError(f"not a number: {value!r}", code=2) from None
    return default


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs
    from .errors import unwrap
    from .service import ConfigError, Service, Settings, default_data_dir

    logs.configure(os.environ.get("SKYDECK_LOG_LEVEL", "INFO"))
    settings = Settings(
        host=args.host or os.environ.get("SKYDECK_HOST") or "127.0.0.1",
        port=_first(args.port, os.environ.get("SKYDECK_PORT"), os.environ.get("PORT"), 1941, int),
        data_dir=Path(args.data_dir or os.environ.get("SKYDECK_DATA_DIR") or default_data_dir()),
        token=args.token or os.environ.get("SKYDECK_TOKEN") or None,
        jwt_secret=os.environ.get("SKYDECK_JWT_SECRET") or None,
        grace_s=float(args.grace if args.grace is not None else 30),
        vault_url=args.vault_url or os.environ.get("SKYDECK_VAULT_URL") or None,
        vault_token=args.vault_token or os.environ.get("SKYDECK_VAULT_TOKEN") or None,
        vault_poll_s=_first(
            args.vault_poll, os.environ.get("SKYDECK_VAULT_POLL_S"), None, 60, float
        ),
        demo=args.demo,
        insecure=args.insecure,
        max_turns=_first(args.max_turns, os.environ.get("SKYDECK_MAX_TURNS"), None, 4, int),
    )
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
    return 0


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
        if args.env:
            body["env"] = dict(item.split("=", 1) for item in args.env)
        agent = client.request("POST", "/api/agents", body)
        print(f"added agent {agent['name']} on channel {agent['channel']} ({agent['backend']})")
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
        print(f"{ack['state']} {ack['id']}")
        return 0
    events = client.events(args.channel)
    next(events)  # subscribed: no event of our turn can be missed from here on
    ack = client.request("POST", path, {"content": args.text})
    if ack["state"] == "buffered":
        print(
            f"no agent serves channel {args.channel} yet; the message is kept ({ack['id']})",
            file=sys.stderr,
        )
        return 0
    message = client.request("GET", f"/api/messages/{ack['id']}")
    if message["state"] in ("done", "failed", "cancelled", "dropped"):
        return _print_outcome(client, message)
    for event in events:
        if event is None or event.get("message_id") != ack["id"]:
            continue
        if event["kind"] == "done":
            if event.get("reply"):
                print(event["reply"])
            return 0
        if event["kind"] == "error":
            print(f"skydeck: turn failed: {event['error']}", file=sys.stderr)
            return 1
    raise CliError("the daemon closed the event stream before the turn ended")


def _print_outcome(client: Client, message: dict[str, Any]) -> int:
    if message["state"] == "done":
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


# -- parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skydeck", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"skydeck {__version__}")
    parser.add_argument("--url", default=os.environ.get("SKYDECK_URL", DEFAULT_URL))
    parser.add_argument("--token", default=os.environ.get("SKYDECK_TOKEN"))
    commands = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, env SKYDECK_HOST)")
    serve.add_argument("--port", type=int, help="port (default 1941, env SKYDECK_PORT or PORT)")
    serve.add_argument("--data-dir", help="where the SQLite store lives (env SKYDECK_DATA_DIR)")
    serve.add_argument("--token", dest="serve_token", help="bearer token (env SKYDECK_TOKEN)")
    serve.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True)
    serve.add_argument("--insecure", action="store_true", help="allow a public bind, no token")
    serve.add_argument("--max-turns", type=int, help="concurrent turns across channels (4)")
    serve.add_argument("--grace", type=float, help="seconds running turns get at shutdown (30)")
    serve.add_argument("--vault-url", help="Parachute Vault URL (env SKYDECK_VAULT_URL)")
    serve.add_argument("--vault-token", help="vault token (env SKYDECK_VAULT_TOKEN)")
    serve.add_argument("--vault-poll", type=float, help="definition poll seconds (60)")

    agent = commands.add_parser("agent", help="manage agents")
    agent_cmds = agent.add_subparsers(dest="agent_cmd", required=True, metavar="ACTION")
    add = agent_cmds.add_parser("add", help="create an agent")
    add.add_argument("name")
    add.add_argument("--channel", required=True)
    add.add_argument("--backend", choices=BACKENDS)
    add.add_argument("--mode", choices=MODES)
    add.add_argument("--queue-mode", choices=QUEUE_MODES)
    add.add_argument("--model")
    prompt = add.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt")
    prompt.add_argument("--system-prompt-file")
    add.add_argument("--command", help='the program, split like a shell: "prog arg ..."')
    add.add_argument("--timeout", type=int, help="turn timeout in seconds (default 900)")
    add.add_argument("--env", action="append", metavar="KEY=VALUE", help="repeatable")
    for action in ("ls", "show"):
        sub = agent_cmds.add_parser(action, help=f"{action} agents")
        if action == "show":
            sub.add_argument("name")
        sub.add_argument("--json", action="store_true", help="raw JSON")
    for action in ("rm", "reset"):
        agent_cmds.add_parser(action, help=f"{action} an agent").add_argument("name")

    job = commands.add_parser("job", help="manage cron jobs")
    job_cmds = job.add_subparsers(dest="job_cmd", required=True, metavar="ACTION")
    job_add = job_cmds.add_parser("add", help="create a job")
    job_add.add_argument("name")
    job_add.add_argument("--channel", required=True)
    job_add.add_argument("--schedule", required=True, help='5-field cron, e.g. "*/5 * * * *"')
    job_add.add_argument("--content", required=True, help="the message each run posts")
    job_add.add_argument("--timezone", default="UTC", help="IANA zone (default UTC)")
    job_cmds.add_parser("ls", help="list jobs").add_argument("--json", action="store_true")
    for action in ("rm", "run"):
        job_cmds.add_parser(action, help=f"{action} a job").add_argument("name")

    send = commands.add_parser("send", help="post a message to a channel")
    send.add_argument("channel")
    send.add_argument("text")
    send.add_argument("--wait", action="store_true", help="wait for the turn, print the reply")

    tail = commands.add_parser("tail", help="print a channel's turn events as they come")
    tail.add_argument("channel")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            if args.serve_token:
                args.token = args.serve_token
            return cmd_serve(args)
        client = Client(args.url, args.token)
        if args.cmd == "agent":
            return cmd_agent(args, client)
        if args.cmd == "send":
            return cmd_send(args, client)
        if args.cmd == "job":
            return cmd_job(args, client)
        return cmd_tail(args, client)
    except CliError as exc:
        print(f"skydeck: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
