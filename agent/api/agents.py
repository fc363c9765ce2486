"""`GET /agents`: the cluster members in the Go agent's JSON shape."""

from __future__ import annotations

from aiohttp import web

from agent.cluster.membership import Member
from agent.errors import Code, json_error


async def list_agents(clustered: bool, members: list[Member], me: Member) -> web.Response:
    """The members as Serf sees them; this node is added while Serf has not listed it yet."""
    if not clustered:
        # The Go agent's answer, word for word (http/handler/agent/agent_list.go).
        return json_error(503, "Agent management is not available when running the agent on a standalone engine",
                          Code.UNAVAILABLE, details="Agent management is disabled")
    if not any(m.node_name == me.node_name for m in members):
        members = [me, *members]
    return web.json_response([m.to_api() for m in members])
