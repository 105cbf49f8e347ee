"""The web UI in a real browser: Debian's Chromium driven by Playwright, against
a real daemon process on loopback (echo and command backends)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from daemon_process import DaemonProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE: ViewportSize = {"width": 390, "height": 780}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("web") / "data")
    yield process
    assert process.stop() == 0


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=PHONE)
    # The daemon's Content-Security-Policy (issue 11, D1) must never block the UI itself.
    context.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    violations = page.evaluate("window.__csp || []") if not page.is_closed() else []
    context.close()
    assert errors == [], f"JavaScript errors: {errors}"
    assert violations == [], f"CSP violations: {violations}"


def shot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


def test_agents_list_and_create_an_agent_in_the_form(
    page: Page, daemon: DaemonProcess, tmp_path: Path
) -> None:
    page.goto(daemon.url + "/")
    expect(page.locator("[data-agent=demo] .badge")).to_have_text("idle")
    shot(page, tmp_path, "agents")
    page.get_by_role("link", name="New agent").click()
    page.get_by_label("Name").fill("shouter")
    page.get_by_label("Channel").fill("shouter")
    page.get_by_label("Backend").select_option("command")
    page.get_by_label("Command").fill("tr a-z A-Z")
    shot(page, tmp_path, "new-agent")
    page.get_by_role("button", name="Create agent").click()
    expect(page.get_by_role("heading", name="#shouter")).to_be_visible()
    agents = httpx.get(f"{daemon.url}/api/agents").json()["agents"]
    assert {a["name"]: a["command"] for a in agents}["shouter"] == ["tr", "a-z", "A-Z"]


def test_invalid_form_input_shows_the_apis_message_inline(
    page: Page, daemon: DaemonProcess
) -> None:
    page.goto(daemon.url + "/#/agents/new")
    page.get_by_label("Name").fill("__proto__")
    page.get_by_label("Channel").fill("ok")
    page.get_by_role("button", name="Create agent").click()
    error = page.locator("#name-error")
    expect(error).to_have_text(
        "name must be 1-64 characters of letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )
    expect(page.get_by_label("Name")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Name").fill("fine")
    page.get_by_label("Channel").fill("demo")
    page.get_by_role("button", name="Create agent").click()
    expect(page.locator("#channel-error")).to_contain_text("already served by agent 'demo'")


def test_send_a_message_and_see_the_reply_stream_in(
    page: Page, daemon: DaemonProcess, tmp_path: Path
) -> None:
    page.goto(daemon.url + "/#/chat/demo")
    composer = page.get_by_role("textbox", name="Message")
    composer.fill("hello from the browser")
    composer.press("Enter")
    reply = page.locator(".bubble.out").last
    expect(reply).to_have_text("echo: hello from the browser")
    expect(reply).not_to_have_class("bubble out pending")
    expect(page.locator(".bubble.in").last).to_contain_text("hello from the browser")
    shot(page, tmp_path, "chat")
    page.set_viewport_size({"width": 900, "height": 600})
    page.screenshot(path=str(tmp_path / "chat-wide.png"))


def test_a_running_turn_shows_a_live_bubble_that_resolves(
    page: Page, daemon: DaemonProcess
) -> None:
    httpx.post(
        f"{daemon.url}/api/agents",
        json={
            "name": "slowpoke",
            "channel": "slowpoke",
            "backend": "command",
            "command": [
                sys.executable,
                "-c",
                "import sys, time; time.sleep(1.5); print(sys.stdin.read())",
            ],
        },
    ).raise_for_status()
    page.goto(daemon.url + "/#/chat/slowpoke")
    page.get_by_role("textbox", name="Message").fill("wait for it")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".bubble.out.pending")).to_have_count(1)  # a live bubble, not a spinner
    expect(page.locator(".bubble.out").last).to_have_text("wait for it", timeout=15000)
    expect(page.locator(".bubble.out.pending")).to_have_count(0)


def test_mcp_m27_a_notify_shows_as_an_agent_bubble_at_once(
    page: Page, daemon: DaemonProcess
) -> None:
    page.goto(daemon.url + "/#/chat/notes")
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    page.wait_for_timeout(300)  # the live stream is subscribed
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}
    with httpx.Client(base_url=daemon.url) as http:
        opened = http.post("/mcp/notes", json={**init, "params": {"protocolVersion": "x"}})
        call = {"name": "notify", "arguments": {"content": "progress: 50%"}}
        body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}
        headers = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
        assert http.post("/mcp/notes", json=body, headers=headers).status_code == 200
    note = page.locator(".bubble.out").last
    expect(note).to_contain_text("progress: 50%")
    expect(page.locator(".bubble.error")).to_have_count(0)


def test_a_failing_agent_shows_an_error_bubble(page: Page, daemon: DaemonProcess) -> None:
    httpx.post(
        f"{daemon.url}/api/agents",
        json={
            "name": "broken",
            "channel": "broken",
            "backend": "command",
            "command": ["sh", "-c", "echo the tool fell over >&2; exit 2"],
        },
    ).raise_for_status()
    page.goto(daemon.url + "/#/chat/broken")
    page.get_by_role("textbox", name="Message").fill("try")
    page.get_by_role("button", name="Send").click()
    error = page.locator(".bubble.error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("the tool fell over")
    expect(page.locator(".bubble.pending")).to_have_count(0)
    page.reload()  # and from the transcript, the stored failure reply
    expect(page.locator(".bubble.error")).to_contain_text("the turn failed: the tool fell over")


def test_paging_back_through_a_1000_message_transcript(
    page: Page, daemon: DaemonProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=daemon.url) as client:
        for i in range(1000):
            client.post("/api/channels/archive/messages", json={"content": f"note {i:04d}"})
    page.goto(daemon.url + "/#/chat/archive")
    expect(page.locator(".bubble")).to_have_count(50)
    expect(page.locator(".bubble").last).to_contain_text("note 0999")
    older = page.get_by_role("button", name="Load earlier messages")
    clicks = 0
    while older.is_visible():
        before = page.locator(".bubble").count()
        older.click()
        expect(page.locator(".bubble")).not_to_have_count(before)
        clicks += 1
    expect(page.locator(".bubble")).to_have_count(1000)
    expect(page.locator(".bubble").first).to_contain_text("note 0000")
    assert clicks == 10  # 50 + 9 x 100 + 50
    shot(page, tmp_path, "archive")


def test_jobs_list_with_run_now_and_delete(
    page: Page, daemon: DaemonProcess, tmp_path: Path
) -> None:
    httpx.post(
        f"{daemon.url}/api/jobs",
        json={
            "name": "standup",
            "channel": "demo",
            "schedule": "0 9 * * 1-5",
            "content": "standup time",
        },
    ).raise_for_status()
    page.goto(daemon.url + "/#/jobs")
    row = page.locator("[data-job=standup]")
    expect(row).to_contain_text("0 9 * * 1-5")
    shot(page, tmp_path, "jobs")
    row.get_by_role("button", name="Run now").click()
    expect(page.locator("#jobs-note")).to_contain_text("standup: posted (queued)")
    page.on("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("[data-job=standup]")).to_have_count(0)


def test_with_a_token_the_ui_asks_once_then_works(browser: Browser, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", "--token", "ui-secret-token")
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    try:
        page.goto(daemon.url + "/")
        dialog = page.get_by_role("dialog")
        expect(dialog).to_be_visible()
        page.get_by_label("Access token").fill("wrong")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-error")).to_have_text("That token was not accepted.")
        shot(page, tmp_path, "token")
        page.get_by_label("Access token").fill("ui-secret-token")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("[data-agent=demo]")).to_be_visible()
        page.goto(daemon.url + "/#/chat/demo")  # no second prompt: the tab keeps the token
        page.get_by_role("textbox", name="Message").fill("authorised")
        page.get_by_role("textbox", name="Message").press("Enter")
        expect(page.locator(".bubble.out").last).to_have_text("echo: authorised")
        expect(page.get_by_role("dialog")).to_be_hidden()
        log = (tmp_path / "data-daemon.log").read_text()
        assert "ui-secret-token" not in log, "the token never reaches the daemon's log"
    finally:
        context.close()
        assert daemon.stop() == 0


def test_tool_uses_show_as_they_happen_with_the_real_claude_cli(page: Page, tmp_path: Path) -> None:
    """The claude backend (real CLI) against the fake Anthropic API: the tool use
    appears in the chat before the final reply."""
    steps = [
        {"tool": ["Bash", {"command": "echo hi", "description": "say hi"}]},
        {"text": "The command printed hi."},
    ]
    fake = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "fake_anthropic.py"), json.dumps(steps)],
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None
        api_url = fake.stdout.readline().decode().split()[-1].removesuffix("/api")
        daemon = DaemonProcess(
            tmp_path / "data",
            env={"ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": "sk-ant-fake"},
        )
        try:
            httpx.post(
                f"{daemon.url}/api/agents",
                json={
                    "name": "coder",
                    "channel": "coder",
                    "backend": "claude",
                },
            ).raise_for_status()
            page.goto(daemon.url + "/#/chat/coder")
            page.get_by_role("textbox", name="Message").fill("run echo hi")
            page.get_by_role("button", name="Send").click()
            tool = page.locator(".tool")
            expect(tool).to_contain_text('Bash {"command":"echo hi"', timeout=30000)
            expect(page.locator(".bubble.out").last).to_have_text(
                "The command printed hi.", timeout=30000
            )
            order = page.eval_on_selector_all(".log > *", "nodes => nodes.map(n => n.className)")
            assert order.index("tool") < len(order) - 1, "the tool shows before the reply"
            shot(page, tmp_path, "chat-tool")
        finally:
            assert daemon.stop() == 0
    finally:
        fake.terminate()
        fake.wait(10)
