"""`/websocket/attach` and `/websocket/exec`: Portainer's console, a WebSocket over Docker's hijacked stream.

Client messages go to Docker as they are; Docker's output goes back as text messages, decoded incrementally
so that a UTF-8 character split across two reads is never corrupted (the Go agent drops such bytes). Resize
goes through the normal proxy (`POST /containers/{id}/resize`, `/exec/{id}/resize`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re

from aiohttp import WSMsgType, web
from prometheus_client import Gauge

from agent.errors import Code, json_error, log_failure
from agent.tasks import spawn
from proxy.forward import CHUNK, HijackError, Upstream, UpstreamHandshake, open_hijack

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


def docker_request(kind: str, ident: str) -> tuple[str, bytes]:
    """The hijack request the Go agent sends for each console kind (docs/protocol.md, "Agent endpoints")."""
    if kind == "attach":
        return f"/containers/{ident}/attach?stdin=1&stdout=1&stderr=1&stream=1", b""
    return f"/exec/{ident}/start", b'{"Tty":true,"Detach":false}'


async def _docker_to_ws(hs: UpstreamHandshake, ws: web.WebSocketResponse) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        data = await hs.reader.read(CHUNK)
        if not data:
            tail = decoder.decode(b"", final=True)
            if tail:
                await ws.send_str(tail)
            return
        text = decoder.decode(data)
        if text:
            await ws.send_str(text)


async def _ws_to_docker(hs: UpstreamHandshake, ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            hs.writer.write(msg.data.encode())
        elif msg.type is WSMsgType.BINARY:
            hs.writer.write(msg.data)
        else:
            break
        await hs.writer.drain()


async def _keepalive(ws: web.WebSocketResponse, period: float) -> None:
    """A ping every `period` (Go: 50 s) so that proxies and load balancers keep an idle console open; like
    Go, a missing pong does not end the session."""
    while True:
        await asyncio.sleep(period)
        await ws.ping()


async def handle_websocket(request: web.Request, kind: str, engine: Upstream, sessions: Gauge,
                           ping_period: float) -> web.StreamResponse:
    """One console: ``kind`` attach or exec, relayed between the WebSocket and the engine's hijacked stream;
    ``sessions`` counts the open ones."""
    ident = request.query.get("id", "")
    if not _ID.match(ident):
        return json_error(400, "Invalid query parameter: id", Code.BAD_REQUEST, path=request.path)
    path, body = docker_request(kind, ident)
    headers = {"Content-Type": "application/json"} if body else {}
    try:
        hs = await open_hijack(engine, "POST", path, headers, body)
    except (OSError, HijackError) as exc:
        return json_error(502, f"Unable to reach the Docker engine: {exc}", Code.PROXY_DOCKER_UNREACHABLE)
    if not hs.upgraded:
        hs.close()
        message = hs.body.decode(errors="replace").strip() or f"Docker answered {hs.status}"
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(message).get("message", message)
        return json_error(hs.status if hs.status >= 400 else 500, message, Code.WEBSOCKET_FAILED, id=ident)
    ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
    await ws.prepare(request)
    sessions.inc()
    down = spawn(_docker_to_ws(hs, ws), "console-down", owned=True)
    up = spawn(_ws_to_docker(hs, ws), "console-up", owned=True)
    pinger = spawn(_keepalive(ws, ping_period), "console-ping", owned=True)
    try:
        done, _ = await asyncio.wait({down, up, pinger}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, ConnectionError):
                log_failure(Code.WEBSOCKET_FAILED, f"console session ended with an error: {error}", id=ident)
    finally:
        sessions.dec()
        for task in (down, up, pinger):
            task.cancel()
        await asyncio.gather(down, up, pinger, return_exceptions=True)
        hs.close()
        await ws.close()
    return ws
