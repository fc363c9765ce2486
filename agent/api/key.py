"""`/key`: the Edge key endpoint. Outside Edge mode it answers 503, as the Go agent does."""

from __future__ import annotations

from aiohttp import web

from agent.errors import Code, json_error

EDGE_KEY_HANDLER: web.AppKey[object] = web.AppKey("edge_key_handler")


async def handle_key(request: web.Request) -> web.StreamResponse:
    handler = request.app.get(EDGE_KEY_HANDLER)
    if handler is None:
        return json_error(503, "Edge key management is disabled on non Edge agent", Code.UNAVAILABLE,
                          details="Edge key management is disabled")
    return await handler(request)  # type: ignore[operator]
