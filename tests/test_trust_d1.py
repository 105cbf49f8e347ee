"""Issue 11, D1: a web page must not drive the daemon (cross-site POSTs, DNS rebinding).

Every test runs a real `skydeck serve` process in the default mode (loopback,
no token), the mode the attack used.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from daemon_process import DaemonProcess
from test_web import CHROMIUM, CHROMIUM_ARGS

PWN_AGENT = {"name": "pwn", "channel": "pwn", "backend": "command"}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "data",
        env={
            "SKYDECK_ALLOWED_HOSTS": "agents.example",
            "SKYDECK_ALLOWED_ORIGINS": "http://ui.example:8080",
            # Unsandboxed, so the marker an accepted attack would write stays a real witness.
            "SKYDECK_SANDBOX": "off",
        },
    )
    yield process
    assert process.stop() == 0


def pwn_body(marker: Path) -> str:
    return httpx.Request(
        "POST", "http://x", json={**PWN_AGENT, "command": ["sh", "-c", f"id > {marker}"]}
    ).content.decode()


def agent_names(url: str) -> set[str]:
    return {agent["name"] for agent in httpx.get(f"{url}/api/agents").json()["agents"]}


def test_trust_d1_text_plain_and_foreign_origin_posts_are_refused(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The observed attack, byte for byte, and its variants: nothing is stored or run."""
    marker = tmp_path / "pwned"
    url = daemon.url
    body = pwn_body(marker)
    attempts = [
        # the curl of the report: foreign Origin and text/plain
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
        # a page that manages to send JSON still has a foreign Origin
        ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
        # another loopback port is another origin
        ({"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"}, 403),
        ({"Origin": "null", "Content-Type": "application/json"}, 403),
        ({"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403),
        # no Origin at all (a "simple" request from a non-browser): the media type decides
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({}, 415),
    ]
    for headers, status in attempts:
        response = httpx.post(f"{url}/api/agents", content=body, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert response.json()["ok"] is False
    assert httpx.post(
        f"{url}/api/agents", content=body, headers={"Content-Type": "text/plain"}
    ).json() == {"ok": False, "error": "send Content-Type: application/json"}
    for path in ("/api/channels/demo/messages", "/api/inbound"):
        response = httpx.post(
            f"{url}{path}",
            content=b'{"channel": "demo", "content": "hi"}',
            headers={"Content-Type": "text/plain"},
        )
        assert response.status_code == 415, path
    assert "pwn" not in agent_names(url)
    messages = httpx.get(f"{url}/api/channels/demo/messages").json()["messages"]
    assert messages == [], "a refused post stored nothing"
    assert not marker.exists()


def test_trust_d1_programs_and_the_daemons_own_origin_keep_working(
    daemon: DaemonProcess,
) -> None:
    """CLI-like clients (no Origin), the UI's own origin, a charset, and the allowed origin."""
    url = daemon.url
    port = url.rsplit(":", 1)[1]
    ok_headers = [
        {},
        {"Origin": url},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Origin": "http://ui.example:8080"},
        {"Sec-Fetch-Site": "same-origin", "Origin": url},
    ]
    for i, headers in enumerate(ok_headers):
        response = httpx.post(
            f"{url}/api/channels/demo/messages",
            content=f'{{"content": "hello {i}"}}'.encode(),
            headers={"Content-Type": "application/json; charset=utf-8", **headers},
        )
        assert response.status_code == 200, (headers, response.text)
    # A GET from a foreign origin is refused too: DNS rebinding aside, no page reads the API.
    response = httpx.get(f"{url}/api/agents", headers={"Origin": "http://evil.example"})
    assert response.status_code == 403
    assert httpx.get(f"{url}/metrics", headers={"Origin": "http://evil.example"}).status_code == 403


def test_trust_d1_foreign_host_header_is_421(daemon: DaemonProcess) -> None:
    """DNS rebinding: evil.example resolved to 127.0.0.1 still says `Host: evil.example`."""
    url = daemon.url
    port = url.rsplit(":", 1)[1]
    for path in ("/", "/health", "/api/agents", "/web/app.js"):
        response = httpx.get(f"{url}{path}", headers={"Host": "evil.example"})
        assert response.status_code == 421, path
    refused = httpx.get(f"{url}/api/agents", headers={"Host": f"evil.example:{port}"})
    assert refused.status_code == 421
    assert refused.json() == {
        "ok": False,
        "error": "this daemon does not answer for that Host header",
    }
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        "LOCALHOST",
        f"[::1]:{port}",
        "127.1.2.3",
        "agents.example",  # SKYDECK_ALLOWED_HOSTS
        f"agents.example:{port}",
    ):
        assert httpx.get(f"{url}/api/agents", headers={"Host": host}).status_code == 200, host


def test_trust_d1_ui_responses_carry_the_security_headers(daemon: DaemonProcess) -> None:
    for path in ("/", "/web/app.js", "/api/agents", "/health", "/api/nope"):
        headers = httpx.get(f"{daemon.url}{path}").headers
        assert headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"


class _EvilPage(http.server.BaseHTTPRequestHandler):
    """A page on another loopback port that tries what the report did, from a browser."""

    daemon_url = ""
    marker = ""

    def do_GET(self) -> None:
        script = f"""
        const daemon = {self.daemon_url!r};
        const agent = {{name: "pwn", channel: "pwn", backend: "command",
                       command: ["sh", "-c", "id > " + {self.marker!r}]}};
        async function attack() {{
          const tries = [
            fetch(daemon + "/api/agents", {{method: "POST", mode: "no-cors",
              headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify(agent)}}),
            fetch(daemon + "/api/channels/pwn/messages", {{method: "POST", mode: "no-cors",
              headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({{content: "go"}})}}),
            fetch(daemon + "/api/agents", {{method: "POST",
              headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(agent)}}),
            fetch(daemon + "/api/agents").then((r) => r.text()),
          ];
          const results = await Promise.allSettled(tries);
          document.title = "done " + results.map((r) => r.status).join(",");
        }}
        attack();
        """
        page = f"<!doctype html><title>evil</title><script>{script}</script>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: object) -> None:
        pass


def test_trust_d1_a_page_on_another_loopback_port_cannot_create_or_run_an_agent(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned-by-browser"
    _EvilPage.daemon_url = daemon.url
    _EvilPage.marker = str(marker)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EvilPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_function("document.title.startsWith('done')", timeout=15_000)
            title = page.title()
            browser.close()
    finally:
        server.shutdown()
    # The no-cors posts "succeed" from the page's view (opaque answers); the CORS ones fail.
    assert title == "done fulfilled,fulfilled,rejected,rejected", title
    assert "pwn" not in agent_names(daemon.url)
    assert httpx.get(f"{daemon.url}/api/channels/pwn/messages").json()["messages"] == []
    assert not marker.exists()
