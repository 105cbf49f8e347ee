"""`GET /api/openapi.json`: complete (the URL map), built from validate.py's tables,
and conformant: schemathesis, which nobody here wrote, fuzzes a real daemon
from the served document alone (every route, positive and negative data, its
stateful links) and finds no server error and no response that breaks it."""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import CheckContext, negative_data_rejection, positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.schemas import OpenApiSchema

from daemon_process import DaemonProcess
from skydeck import openapi, validate
from skydeck.app import BODY_TIMEOUT_S, MAX_BODY_BYTES
from skydeck.auth import scope_for
from skydeck.ledger import MessageState, ThreadStatus
from skydeck.model import (
    BACKENDS,
    MODES,
    QUEUE_MODES,
    AgentSpec,
    Job,
    Message,
    ThreadRecord,
    is_valid_name,
)
from skydeck.service import Service, Settings
from test_fuzz import defuse

TOKEN = "openapi-fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SSE_PATH = "/api/channels/{channel}/turn-events"
IMPLICIT = {"HEAD", "OPTIONS"}  # answered by the framework for every route


def built() -> dict[str, Any]:
    return openapi.document(max_body=1024, body_timeout_s=5)


# -- the document covers the app, and is made of validate.py's tables -----------------


def test_every_route_of_the_url_map_is_an_operation_and_nothing_else(tmp_path: Path) -> None:
    service = Service(Settings(port=0, data_dir=tmp_path))
    served = set()
    for rule in service.app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        served |= {
            (m.lower(), path, rule.endpoint) for m in rule.methods or () if m not in IMPLICIT
        }
    service.store.close()
    documented = {
        (method, path, operation["operationId"])
        for path, item in built()["paths"].items()
        for method, operation in item.items()
    }
    assert documented == served


def test_request_schemas_are_validate_py_field_tables() -> None:
    schemas = built()["components"]["schemas"]
    properties = {name: set(schema.get("properties", ())) for name, schema in schemas.items()}
    assert properties["NewAgent"] == properties["AgentChanges"] == validate._AGENT_FIELDS
    assert properties["NewJob"] == properties["JobChanges"] == validate._JOB_FIELDS
    assert properties["PlainInbound"] == validate._PLAIN_FIELDS
    assert properties["ChannelInbound"] == validate._PLAIN_FIELDS - {"channel"}
    agent = schemas["NewAgent"]["properties"]
    assert agent["backend"]["enum"] == list(BACKENDS)
    assert agent["mode"]["enum"] == list(MODES)
    assert agent["queue_mode"]["enum"] == list(QUEUE_MODES)
    assert agent["timeout_s"]["maximum"] == validate.MAX_TIMEOUT_S
    assert agent["timeout_s"]["default"] == AgentSpec.__dataclass_fields__["timeout_s"].default
    assert schemas["NewAgent"]["required"] == ["name", "channel"]
    for schema in (schemas["NewAgent"], schemas["PlainInbound"], schemas["NewJob"]):
        assert schema["additionalProperties"] is False, "unknown fields are a 400"


def test_a_field_added_to_a_table_without_a_schema_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openapi, "_AGENT_FIELDS", validate._AGENT_FIELDS | {"colour"})
    with pytest.raises(KeyError, match="colour"):
        built()


def test_the_name_pattern_is_r1_as_ecma_262() -> None:
    pattern = re.compile(built()["components"]["schemas"]["Name"]["pattern"])
    for value in ("a", "demo", "A.b_c-9", "0" * 64, "a\n", "__proto__", "..", "-x", "0" * 65, ""):
        # Python's `$` also matches before a final newline; ECMA-262's (and `fullmatch`) not.
        assert bool(pattern.fullmatch(value)) == is_valid_name(value), value


def test_response_schemas_are_what_to_json_renders() -> None:
    schemas = built()["components"]["schemas"]
    records: dict[str, Message | ThreadRecord | Job] = {
        "Message": Message(
            id="m",
            seq=1,
            channel="c",
            direction="in",
            content="x",
            state=MessageState.DONE,
            created_at="t",
        ),
        "Thread": ThreadRecord(
            id="t",
            channel="c",
            agent="a",
            mode="multi-threaded",
            status=ThreadStatus.OK,
            input="x",
        ),
        "Job": Job(name="j", channel="c", schedule="* * * * *", content="x"),
    }
    for name, rec in records.items():
        assert set(schemas[name]["required"]) == set(rec.to_json()), name
    agent = AgentSpec(name="a", channel="c").to_json()
    assert set(schemas["Agent"]["required"]) == set(agent) | {
        "status",
        "queued",
        "sandbox_effective",
    }


async def test_the_route_serves_the_document_to_agent_read(daemon_url: str) -> None:
    assert scope_for("GET", "/api/openapi.json") == "agent:read"
    async with httpx.AsyncClient(base_url=daemon_url) as client:
        assert (await client.get("/api/openapi.json")).status_code == 401
        served = await client.get("/api/openapi.json", headers=AUTH)
    assert served.status_code == 200
    assert served.json() == openapi.document(max_body=MAX_BODY_BYTES, body_timeout_s=BODY_TIMEOUT_S)


# -- bugs the document and the fuzz brought out --------------------------------------


async def test_405_names_the_allowed_methods(daemon_url: str) -> None:
    async with httpx.AsyncClient(base_url=daemon_url) as client:
        response = await client.put("/api/agents", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    assert response.json() == {"ok": False, "error": "method not allowed on this route"}


async def test_a_whole_number_written_with_a_fraction_is_that_integer(daemon_url: str) -> None:
    async with httpx.AsyncClient(base_url=daemon_url, headers=AUTH) as client:
        created = await client.post(
            "/api/agents",
            json={
                "name": "whole",
                "channel": "whole",
                "backend": "echo",
                "timeout_s": 60.0,
                "max_reply_bytes": 2e3,
            },
        )
        assert created.status_code == 201, created.text
        assert (created.json()["timeout_s"], created.json()["max_reply_bytes"]) == (60, 2000)
        assert (
            await client.post(
                "/api/agents", json={"name": "half", "channel": "half", "timeout_s": 60.5}
            )
        ).status_code == 400
        ack = await client.post(
            "/api/channels/whole/messages", json={"content": "x", "delegation_depth": 2.0}
        )
        assert ack.status_code == 200, ack.text
        message = (await client.get(f"/api/messages/{ack.json()['id']}")).json()
        assert message["metadata"]["delegation_depth"] == 2


async def test_a_depth_string_over_the_digit_limit_is_a_400_not_a_500(daemon_url: str) -> None:
    digits = "9" * (validate.MAX_NUMBER_DIGITS + 1)
    async with httpx.AsyncClient(base_url=daemon_url, headers=AUTH) as client:
        response = await client.post(
            "/api/inbound", json={"channel": "deep", "content": "x", "delegation_depth": digits}
        )
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "delegation_depth"


async def test_a_file_name_too_long_for_the_os_is_a_404_not_a_500(daemon_url: str) -> None:
    async with httpx.AsyncClient(base_url=daemon_url) as client:
        too_long = await client.get("/web/" + "a" * 300)  # ENAMETOOLONG from stat()
        served = await client.get("/web/app.js")
    assert too_long.status_code == 404, too_long.text
    assert too_long.json() == {"ok": False, "error": "no such route"}
    assert served.status_code == 200


# -- schemathesis against a real daemon ----------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A real `skydeck serve` with a token (so schemathesis's ignored-auth check has
    something to check). Nothing the fuzzer configures can run a program: every
    `command` is rewritten to a missing file (`defuse`, before each request), the
    claude backend points at a missing file, and PATH is an empty directory, so
    not even a bare program name resolves."""
    root = tmp_path_factory.mktemp("openapi")
    empty = root / "bin"
    empty.mkdir()
    env = {"PATH": str(empty), "SKYDECK_CLAUDE_BIN": str(root / "no-claude")}
    daemon = DaemonProcess(root / "data", "--token", TOKEN, env=env)
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def daemon_url(daemon: DaemonProcess) -> str:
    return daemon.url


@pytest.fixture(scope="module")
def served_schema(daemon: DaemonProcess) -> OpenApiSchema:
    config = SchemathesisConfig.from_dict(
        {
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
            # Stateful runs follow the document's own links only (see below).
            "phases": {"stateful": {"inference": {"algorithms": []}}},
        }
    )
    return schemathesis.openapi.from_url(
        f"{daemon.url}/api/openapi.json", config=config, headers=AUTH
    )


@pytest.fixture
def api_schema(served_schema: OpenApiSchema, request: pytest.FixtureRequest) -> OpenApiSchema:
    # schemathesis 4.32's `from_fixture` renames the test node through `_nodeid`,
    # which pytest 9.2 no longer has (it keeps the id elsewhere): give it one.
    node: Any = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid
    return served_schema


#: Rules that hang on the resource's current state, which no request schema can
#: say (the operations' descriptions say them): a PATCH may repeat the name but
#: not change it; an agent on the command backend keeps a command; a cron job stays
#: one and a one-shot stays one; egress needs a workspace sandbox and never names the
#: daemon's own port (S2).
STATE_RULES = {
    ("POST", "/api/agents"): {"egress"},
    ("PATCH", "/api/agents/{name}"): {"name", "command", "egress"},
    ("PATCH", "/api/jobs/{name}"): {"name", "schedule", "run_at"},
    # telegram.md §9: a private chat (a positive id) takes trigger all only.
    ("POST", "/api/telegram/links"): {"trigger"},
    ("PATCH", "/api/telegram/links/{lid}"): {"trigger"},
}


def accepts_valid_data(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """schemathesis's positive-data check, but a 400 for one of `STATE_RULES` passes."""
    if response.status_code == 400 and (case.method, case.path) in STATE_RULES:
        field = json.loads(response.content).get("field")
        if field in STATE_RULES[(case.method, case.path)]:
            return None
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result


def whole_float_past_int64(value: object) -> bool:
    """A number sent with a fraction or an exponent (a float to the daemon, which
    stores any finite one) that JSON Schema calls an integer outside 64 bits."""
    if isinstance(value, float):
        return value.is_integer() and not validate.INT_MIN <= value <= validate.INT_MAX
    if isinstance(value, dict):
        return any(whole_float_past_int64(item) for item in value.values())
    if isinstance(value, list):
        return any(whole_float_past_int64(item) for item in value)
    return False


def rejects_invalid_data(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """schemathesis's negative-data check, but D6's 64-bit rule is about integers as
    written: `9.2e186` is a float to the daemon and an integer to JSON Schema, which
    cannot tell the two apart, so a body whose only "integer" past 64 bits is written
    as a float may be accepted."""
    if response.status_code < 400 and whole_float_past_int64(case.body):
        return None
    result: bool | None = negative_data_rejection(ctx, response, case)
    return result


CHECKS: dict[str, Any] = {
    "excluded_checks": [positive_data_acceptance, negative_data_rejection],
    "additional_checks": [accepts_valid_data, rejects_invalid_data],
}


def call_stream(case: Case[Any]) -> Response:
    """The SSE stream never ends: its status, headers and first frame are the answer."""
    kwargs = case.as_transport_kwargs()
    started = time.monotonic()
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            kwargs["method"], kwargs["url"], headers=kwargs["headers"], params=kwargs.get("params")
        ) as streamed,
    ):
        first = next(streamed.iter_raw(), b"") if streamed.status_code == 200 else streamed.read()
        response = httpx.Response(
            streamed.status_code, headers=streamed.headers, content=first, request=streamed.request
        )
        response.elapsed = datetime.timedelta(seconds=time.monotonic() - started)
    return Response.from_any(response)


#: `/mcp/{channel}` is JSON-RPC whose answers hang on session state no schema can
#: say (a valid `tools/list` without a live session is a 404); `tests/test_fuzz.py`
#: fuzzes it, and tests/test_mcp.py checks each of its rows.
MCP_PATHS = "^/mcp/"
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=MCP_PATHS)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error_and_no_schema_violation(case: Case[Any]) -> None:
    case.body = defuse(case.body)
    if case.path == SSE_PATH:
        case.validate_response(call_stream(case), **CHECKS)
    else:
        case.call_and_validate(timeout=30, **CHECKS)


def test_schemathesis_stateful_links_find_nothing(
    served_schema: OpenApiSchema, daemon: DaemonProcess
) -> None:
    """Sequences that follow the document's links (create an agent, then get, patch,
    post to and delete it; create a job, then run it; post, then get the message).

    Every scenario starts with no agent and no job, so the same drawn steps meet the
    same daemon (Hypothesis replays scenarios to shrink them, and calls data that
    depends on what an earlier scenario left behind flaky); and only the document's
    own links are followed, not schemathesis's guesses from list responses.
    """

    class Machine(served_schema.exclude(path_regex=MCP_PATHS).as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as client:
                for kind in ("agents", "jobs"):
                    for item in client.get(f"/api/{kind}").json()[kind]:
                        client.delete(f"/api/{kind}/{item['name']}").raise_for_status()

        def before_call(self, case: Case[Any]) -> None:
            case.body = defuse(case.body)

        def call(self, case: Case[Any], **kwargs: Any) -> Response:
            return call_stream(case) if case.path == SSE_PATH else case.call(timeout=30)

        def validate_response(self, response: Response, case: Case[Any], **kwargs: Any) -> None:
            case.validate_response(response, **CHECKS)

    Machine.run(
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
