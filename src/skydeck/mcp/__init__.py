"""skydeck as an MCP server: agents act through ``/mcp/{channel}`` mid-turn.

- `protocol`: JSON-RPC and MCP versions, as pure decisions (M2-M7);
- `access`: turn tokens, outside callers, sessions (M4, M8, M10);
- `tools`: the eight tools, their schemas, checks and effects (M11-M23);
- `endpoint`: the route's logic, from headers and body to a reply (M1-M6);
- `wiring`: each turn's token and config file around its backend call (M8, M9, M24, M25).

The rules are ``shared/spec/mcp.md``; docs/mcp.md is the user's page.
"""
