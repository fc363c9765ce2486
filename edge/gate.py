"""The Edge agent's HTTP gate and `/key` (Go's http/handler/key and its key check, messages kept).

Before a key is set, every request but `/key` gets Go's 403; each request that passes counts as tunnel
activity. `GET /key` gives the key (404 without one), `POST /key` sets it while the association window is
open (204; 400 malformed; 409 when one is set already).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from edge.key import EdgeKey, EdgeKeyError, KeyAlreadySetError

MSG_NO_KEY = "Unable to use the unsecured agent API without Edge key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class KeyHolder(Protocol):
    """What the gate needs of the Edge runtime."""

    @property
    def key(self) -> EdgeKey | None: ...
    @property
    def accepting_keys(self) -> bool: ...
    def current_key(self) -> str: ...
    def record_activity(self) -> None: ...
    async def set_key(self, text: str, source: str) -> None: ...


def error(status: int, message: str, details: str) -> web.Response:
    """Portainer's libhttp error body: ``{"message","details"}``."""
    return web.json_response({"message": message, "details": details}, status=status)


def is_key_path(path: str) -> bool:
    return path.lstrip("/").split("/", 1)[0] == "key"


def gate_middleware(holder: KeyHolder) -> Any:
    @web.middleware
    async def edge_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_key_path(request.path) and (request.method != "POST" or holder.key is not None
                                          or holder.accepting_keys):
            return await handler(request)
        if holder.key is None:
            return error(403, MSG_NO_KEY, "Edge key not set")
        holder.record_activity()
        return await handler(request)

    return edge_gate


async def handle_key(holder: KeyHolder, request: web.Request) -> web.StreamResponse:
    """``GET /key`` and ``POST /key``."""
    if request.path != "/key":
        return error(404, "Not found", f"no such Edge key endpoint: {request.path}")
    if request.method == "GET":
        if holder.key is None:
            return error(404, "No key associated to this agent", "Edge key unavailable")
        return web.json_response({"key": holder.current_key()})
    if request.method != "POST":
        return error(405, "Method not allowed", f"{request.method} is not supported on /key")
    if holder.key is not None:
        return error(409, "An Edge key is already associated to this agent", "Edge key already associated")
    try:
        payload = json.loads(await request.content.read(64 * 1024))
        if not isinstance(payload, dict):
            raise ValueError("the payload is not a JSON object")
    except ValueError as exc:
        return error(400, "Invalid request payload", str(exc) or "invalid JSON")
    # Go's JSON decoding matches field names case-insensitively: {"Key"} and {"key"} both work.
    text = next((v for k, v in payload.items() if k.lower() == "key"), "")
    if not isinstance(text, str) or not text.strip():
        return error(400, "Invalid request payload", "Invalid key")
    try:
        await holder.set_key(text, "POST /key")
    except EdgeKeyError as exc:
        return error(400, "Unable to associate Edge key", str(exc))
    except KeyAlreadySetError:
        return error(409, "An Edge key is already associated to this agent", "Edge key already associated")
    return web.Response(status=204)
