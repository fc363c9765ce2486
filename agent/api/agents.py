"""`GET /agents`: the cluster members in the Go agent's JSON shape."""

from __future__ import annotations

from aiohttp import web

from agent.appkeys import STATE
from agent.errors import Code, json_error


async def list_agents(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.clustered:
        # The Go agent's answer, word for word (http/handler/agent/agent_list.go).
        return json_error(503, "Agent management is not available when running the agent on a standalone engine",
                          Code.UNAVAILABLE, details="Agent management is disabled")
    members = state.members()
    if not any(m.node_name == state.info.node_name for m in members):
        members = [state.self_member, *members]
    return web.json_response([m.to_api() for m in members])
