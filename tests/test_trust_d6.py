"""Issue 11, D6: numbers and strings that strict JSON cannot carry are a 400 naming
the field, never stored, never a 500 — against a real `skydeck serve` process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon_process import DaemonProcess


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "data")
    yield process
    assert process.stop() == 0


def strict(raw: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in a response")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


CASES = [
    (b'{"content":"x","metadata":{"x":NaN}}', "metadata.x", "NaN"),
    (b'{"content":"x","metadata":{"x":Infinity}}', "metadata.x", "Infinity"),
    (b'{"content":"x","metadata":{"deep":[1,{"y":-Infinity}]}}', "metadata.deep[1].y", "-Infinity"),
    (b'{"content":"x","metadata":{"x":1e999}}', "metadata.x", "too large"),
    (b'{"content":"x","metadata":{"big":18446744073709551616}}', "metadata.big", "64-bit"),
    (b'{"content":"x","metadata":{"big":-9223372036854775809}}', "metadata.big", "64-bit"),
    (b'{"content":"x","metadata":{"n":' + b"9" * 4301 + b"}}", "metadata.n", "4300 digits"),
    (b'{"content":"x","metadata":{"n":1.' + b"5" * 4400 + b"}}", "metadata.n", "4300 digits"),
    (b'{"content":"lone \\ud800 high"}', "content", "surrogate"),
    (b'{"content":"x","metadata":{"k":"\\udfff"}}', "metadata.k", "surrogate"),
    (b'{"content":"x","metadata":{"\\udc00":"v"}}', "metadata.\\udc00", "surrogate"),
]


def test_trust_d6_unrepresentable_values_are_400_naming_the_field(daemon: DaemonProcess) -> None:
    url = daemon.url
    for body, field, words in CASES:
        response = httpx.post(
            f"{url}/api/channels/demo/messages",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400, (body[:60], response.text)
        answer = strict(response.content)
        assert answer["field"] == field, answer
        assert words in answer["error"], answer
    # A pair that is a real character and the largest 64-bit integers pass.
    fine = (
        b'{"content":"smile \\ud83d\\ude00",'
        b'"metadata":{"max":9223372036854775807,"min":-9223372036854775808,"f":1.5e308}}'
    )
    ok = httpx.post(
        f"{url}/api/channels/demo/messages",
        content=fine,
        headers={"Content-Type": "application/json"},
    )
    assert ok.status_code == 200, ok.text
    page = httpx.get(f"{url}/api/channels/demo/messages")
    messages = strict(page.content)["messages"]
    inbound = [m for m in messages if m["direction"] == "in"]
    assert [m["content"] for m in inbound] == ["smile 😀"], "only the valid post was stored"
    assert inbound[0]["metadata"]["max"] == 2**63 - 1


def test_trust_d6_agents_and_jobs_bodies_too(daemon: DaemonProcess) -> None:
    url = daemon.url
    headers = {"Content-Type": "application/json"}
    bad_agent = b'{"name":"a","channel":"a","backend":"echo","timeout_s":NaN}'
    response = httpx.post(f"{url}/api/agents", content=bad_agent, headers=headers)
    assert (response.status_code, response.json()["field"]) == (400, "timeout_s")
    bad_env = b'{"name":"a","channel":"a","backend":"echo","env":{"K":"\\ud800"}}'
    response = httpx.post(f"{url}/api/agents", content=bad_env, headers=headers)
    assert (response.status_code, response.json()["field"]) == (400, "env.K")
    bad_job = b'{"name":"j","channel":"c","schedule":"* * * * *","content":"x","enabled":Infinity}'
    response = httpx.post(f"{url}/api/jobs", content=bad_job, headers=headers)
    assert (response.status_code, response.json()["field"]) == (400, "enabled")
    names = {a["name"] for a in httpx.get(f"{url}/api/agents").json()["agents"]}
    assert names == {"demo"}
    assert httpx.get(f"{url}/api/jobs").json()["jobs"] == []
