"""A command agent that acts through skydeck's MCP tools (mcp.md §5, T-a).

Its prompt (stdin) is a JSON list of ``{"tool", "arguments"}`` (plus, optionally,
``"meta"`` for ``_meta`` and ``"sleep_s"`` to wait before the call); it calls each
with the official SDK client at ``SKYDECK_MCP_URL`` with ``SKYDECK_MCP_TOKEN``
and prints the results' structured content as one JSON list: that is its reply
(a prompt that is not JSON, such as a ``[callback]``, is only acknowledged).
With ``SKYDECK_TEST_TOKEN_FILE`` set it also writes its token there, so a test
can try the token after the turn (a file the test names, outside the workspace).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import httpx
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    prompt = sys.stdin.read()
    try:
        calls = json.loads(prompt)
    except json.JSONDecodeError:  # a [callback] or any other prose: nothing to call
        print(f"noted: {prompt.splitlines()[0] if prompt else ''}")
        return
    url, token = os.environ["SKYDECK_MCP_URL"], os.environ["SKYDECK_MCP_TOKEN"]
    if path := os.environ.get("SKYDECK_TEST_TOKEN_FILE"):
        await trio.Path(path).write_text(token)
    results: list[Any] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(headers=headers) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for call in calls:
            if call.get("sleep_s"):
                await trio.sleep(call["sleep_s"])
            result = await session.call_tool(call["tool"], call["arguments"], meta=call.get("meta"))
            results.append(result.structuredContent)
    print(json.dumps(results))


if __name__ == "__main__":
    trio.run(main)
