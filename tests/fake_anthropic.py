"""A fake Anthropic Messages API: the far side of the network for the real
`claude` CLI. It speaks the streaming wire format of shared/spec/claude-cli.md
§9, answers from a per-test script, and records what the CLI sent."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio


@dataclass
class Step:
    """The answer to one real Messages request."""

    text: str | None = None
    tool: tuple[str, dict[str, Any]] | None = None
    status: int | None = None
    error_type: str = "api_error"
    message: str = "Internal server error"
    stall: bool = False
    #: A releasable stall: the answer waits until the test sets this event.
    hold: trio.Event | None = None


@dataclass
class FakeAnthropic:
    steps: deque[Step] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    side_requests: int = 0
    default_text: str = "Hello from fake API."
    url: str = ""
    #: Called with each real request's body as it arrives (a test's probe).
    on_request: Callable[[dict[str, Any]], None] | None = None

    def script(self, *steps: Step) -> None:
        self.steps.extend(steps)

    # -- what tests read ----------------------------------------------------------

    @staticmethod
    def texts(body: dict[str, Any]) -> list[str]:
        """Every text the conversation holds: user prompts, assistant replies, tool results."""
        out: list[str] = []
        for message in body.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                out.append(content)
                continue
            for block in content or []:
                if block.get("type") == "text":
                    out.append(block["text"])
                elif block.get("type") == "tool_result":
                    inner = block.get("content")
                    out.append(inner if isinstance(inner, str) else json.dumps(inner))
        return out

    def last_prompt(self) -> str:
        """The user's text of the newest request (its last text block)."""
        last_user = [m for m in self.requests[-1]["messages"] if m["role"] == "user"][-1]
        content = last_user["content"]
        if isinstance(content, str):
            return content
        texts = [b["text"] for b in content if b.get("type") == "text"]
        return str(texts[-1])

    # -- the app ------------------------------------------------------------------

    def app(self) -> QuartTrio:
        app = QuartTrio("fake-anthropic")

        @app.route("/", methods=["HEAD", "GET"])
        async def root() -> tuple[str, int]:
            return "", 404

        @app.post("/v1/messages")
        async def messages() -> Response | tuple[dict[str, Any], int, dict[str, str]]:
            body = await request.get_json()
            system = json.dumps(body.get("system", ""))
            if not body.get("tools") and "title" in system.lower():
                self.side_requests += 1
                return self._answer(body, Step(text='{"title": "Fake title"}'))
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            if self.on_request is not None:
                self.on_request(body)
            step = self.steps.popleft() if self.steps else Step(text=self.default_text)
            if step.stall:
                await trio.sleep_forever()
            if step.hold is not None:
                await step.hold.wait()
            if step.status is not None:
                error = {
                    "type": "error",
                    "error": {"type": step.error_type, "message": step.message},
                }
                return error, step.status, {"x-should-retry": "false"}
            return self._answer(body, step)

        return app

    def _answer(self, body: dict[str, Any], step: Step) -> Response:
        model = body.get("model", "claude-fake")
        if step.tool is not None:
            name, tool_input = step.tool
            blocks: list[dict[str, Any]] = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{len(self.requests)}",
                    "name": name,
                    "input": tool_input,
                }
            ]
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": step.text or ""}]
            stop = "end_turn"
        usage = {"input_tokens": 12, "output_tokens": 7}
        if not body.get("stream"):
            message = {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": blocks,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": usage,
            }
            return Response(json.dumps(message), content_type="application/json")

        def sse(event: str, data: dict[str, Any]) -> bytes:
            return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode()

        async def stream() -> AsyncIterator[bytes]:
            yield sse(
                "message_start",
                {
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 12, "output_tokens": 1},
                    }
                },
            )
            for index, block in enumerate(blocks):
                if block["type"] == "text":
                    yield sse(
                        "content_block_start",
                        {"index": index, "content_block": {"type": "text", "text": ""}},
                    )
                    yield sse(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "text_delta", "text": block["text"]}},
                    )
                else:
                    yield sse(
                        "content_block_start",
                        {"index": index, "content_block": {**block, "input": {}}},
                    )
                    yield sse(
                        "content_block_delta",
                        {
                            "index": index,
                            "delta": {
                                "type": "input_json_delta",
                                "partial_json": json.dumps(block["input"]),
                            },
                        },
                    )
                yield sse("content_block_stop", {"index": index})
            yield sse(
                "message_delta",
                {
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": 7},
                },
            )
            yield sse("message_stop", {})

        return Response(stream(), content_type="text/event-stream")


def main() -> None:
    """Serve the fake in its own process: `python fake_anthropic.py '<steps as JSON>'`.

    Prints `API: <url>/api` once listening (the browser tests start it this way)."""
    import sys

    from hypercorn.config import Config
    from hypercorn.trio import serve

    fake = FakeAnthropic()
    for step in json.loads(sys.argv[1] if len(sys.argv) > 1 else "[]"):
        if "tool" in step:
            step["tool"] = tuple(step["tool"])
        fake.script(Step(**step))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, fake.app(), config)
            print(f"  API:    {binds[0]}/api", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
