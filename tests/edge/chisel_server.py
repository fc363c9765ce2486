"""A chisel-protocol (``chisel-v3``) server for tests, standing in for Portainer's in-process chisel server.

Written from jpillora/chisel server/server.go, server/server_handler.go, share/tunnel/* and
docs/edge.md (behaviour of a real chisel 1.10 server):

* aiohttp WebSocket endpoint on 127.0.0.1, any path; only ``Sec-WebSocket-Protocol: chisel-v3`` upgrades,
  and the 101 answer does NOT echo the subprotocol; anything else gets 404 "Not found".
* SSH server with identification line ``SSH-chisel-v3-server`` (not ``SSH-2.0-``), one password user.
* After auth the first global request must be ``config`` within ``config_timeout`` (chisel: 10 s), else the
  connection is closed. Each remote's ``R:<LocalHost>:<LocalPort>`` must match the user's regex (Portainer:
  ``^R:0.0.0.0:<port>$``); a refusal is a failure reply whose payload is the reason.
* Then the server listens on the remote's port (on 127.0.0.1 here, tests stay on loopback) and opens a
  ``chisel`` channel, extra data = raw ``RemoteHost:RemotePort``, for every connection there.
* ``ping`` global requests are answered ``pong``; the server also sends one ping after config.

asyncssh is used for the SSH side with the same kind of private hooks as the client (see
edge/tunnel/chisel.py): per-instance ``_process_<name>_global_request`` handlers, ``_open_forward`` for the
custom channel type and ``_server_version`` for the non-standard version line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from aiohttp import web
from asyncssh.constants import MSG_REQUEST_FAILURE, MSG_REQUEST_SUCCESS
from asyncssh.forward import SSHLocalPortForwarder
from asyncssh.packet import SSHPacket

from edge.tunnel.websocket import WebSocketTransport

SERVER_VERSION = b"SSH-chisel-v3-server"


class _VersionRewritingTransport(WebSocketTransport):
    """asyncssh always sends ``SSH-2.0-<version>``; chisel sends ``SSH-chisel-v3-server``: fix the first line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._first:
            self._first = False
            data = bytes(data)
            assert data.startswith(b"SSH-2.0-chisel-v3-server\r\n"), data
            data = SERVER_VERSION + b"\r\n" + data[len(b"SSH-2.0-chisel-v3-server\r\n") :]
        super().write(data)


@dataclass
class Records:
    """What the server saw, for assertions."""

    upgrades: list[str | None] = field(default_factory=list)
    """Sec-WebSocket-Protocol of every upgrade attempt."""
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    config_replies: list[tuple[bool, str]] = field(default_factory=list)
    client_pings: int = 0
    ping_replies: list[tuple[bool, bytes]] = field(default_factory=list)
    client_versions: list[str] = field(default_factory=list)
    timeouts: int = 0


class _Auth(asyncssh.SSHServer):
    def __init__(self, server: ChiselTestServer) -> None:
        self._server = server

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = username in self._server.users and self._server.users[username][0] == password
        self._server.records.auth_attempts.append((username, ok))
        return ok


def _reply(conn: asyncssh.SSHServerConnection, ok: bool, payload: bytes = b"") -> None:
    """Answer the oldest pending global request; unlike asyncssh's helper, failures may carry a payload."""
    queue = conn._global_request_queue
    _, _, want_reply = queue.pop(0)
    if want_reply:
        conn.send_packet(MSG_REQUEST_SUCCESS if ok else MSG_REQUEST_FAILURE, payload)
    if queue:
        conn._service_next_global_request()


class _Session:
    """One client connection: config handshake, then the reverse listener."""

    def __init__(self, server: ChiselTestServer, ws: web.WebSocketResponse) -> None:
        self.server = server
        self.ws = ws
        self.conn: asyncssh.SSHServerConnection | None = None
        self.configured = asyncio.Event()
        self.listeners: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    # asyncssh "tunnel" protocol for connect_reverse

    async def create_connection(
        self, factory: Callable[[], asyncssh.SSHServerConnection], _host: str, _port: int
    ) -> tuple[WebSocketTransport, asyncssh.SSHServerConnection]:
        conn = factory()
        self.conn = conn
        setattr(conn, "_process_config_global_request", self._on_config)  # noqa: B010
        setattr(conn, "_process_ping_global_request", self._on_ping)  # noqa: B010
        transport = _VersionRewritingTransport(self.ws, conn)
        conn.connection_made(transport)
        conn._server_version = SERVER_VERSION  # the exchange hash covers what was really sent
        transport.start()
        return transport, conn

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_ping(self, _packet: SSHPacket) -> None:
        assert self.conn is not None
        if not self.configured.is_set():
            _reply(self.conn, False, b"expecting config request")
            self.conn.close()
            return
        self.server.records.client_pings += 1
        _reply(self.conn, True, b"pong")

    def _on_config(self, packet: SSHPacket) -> None:
        self._spawn(self._handle_config(packet.get_remaining_payload()))

    async def _handle_config(self, payload: bytes) -> None:
        conn = self.conn
        assert conn is not None
        records = self.server.records

        def fail(reason: str) -> None:
            records.config_replies.append((False, reason))
            _reply(conn, False, reason.encode())

        if self.configured.is_set():
            fail("config already received")
            return
        self.configured.set()
        try:
            config = json.loads(payload)
        except ValueError:
            fail("invalid config")
            return
        records.configs.append(config)
        records.client_versions.append(str(config.get("Version")))
        user = conn.get_extra_info("username")
        pattern = self.server.users[user][1]
        remotes = config.get("Remotes") or []
        for remote in remotes:
            addr = f"R:{remote.get('LocalHost') or '0.0.0.0'}:{remote['LocalPort']}"
            if not remote.get("Reverse") or not re.search(pattern, addr):
                fail(f"access to '{addr}' denied")
                return
        for remote in remotes:
            target = self.server.channel_target or f"{remote['RemoteHost']}:{remote['RemotePort']}".encode()
            try:
                listener = await asyncio.get_running_loop().create_server(
                    functools.partial(SSHLocalPortForwarder, conn, self._chisel_opener(target)),
                    "127.0.0.1",
                    int(remote["LocalPort"]),
                )
            except OSError as exc:
                fail(f"Server cannot listen on {remote['LocalPort']}: {exc}")
                return
            self.listeners.append(listener)
        await asyncio.sleep(self.server.config_delay)
        records.config_replies.append((True, ""))
        _reply(conn, True)
        if self.server.send_ping:
            pkttype, reply = await conn._make_global_request(b"ping")
            records.ping_replies.append((pkttype == MSG_REQUEST_SUCCESS, reply.get_remaining_payload()))

    def _chisel_opener(self, target: bytes) -> Callable[..., Awaitable[None]]:
        async def open_channel(session_factory: Callable[[], Any], _orig_host: str, _orig_port: int) -> None:
            assert self.conn is not None
            chan = self.conn.create_tcp_channel()
            await chan._open_forward(session_factory, b"chisel", target)

        return open_channel

    async def run(self) -> None:
        try:
            self.conn = await asyncssh.connect_reverse(
                "127.0.0.1",
                0,
                tunnel=self,
                server_factory=lambda: _Auth(self.server),
                server_host_keys=[self.server.host_key],
                server_version="chisel-v3-server",
                gss_host=None,
                allow_pty=False,
                login_timeout=10,
            )
        except (asyncssh.Error, OSError):
            return  # failed auth or handshake: chisel just drops the connection
        try:
            async with asyncio.timeout(self.server.config_timeout):
                await self.configured.wait()
        except TimeoutError:
            self.server.records.timeouts += 1
            self.conn.close()
        await self.conn.wait_closed()

    async def shutdown(self) -> None:
        for listener in self.listeners:
            listener.close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
        self.listeners.clear()
        for task in list(self.tasks):
            task.cancel()


class ChiselTestServer:
    """Start with ``await start()``; ``url`` and ``fingerprint`` go into the tunnel config."""

    def __init__(
        self,
        users: dict[str, tuple[str, str]],
        *,
        config_timeout: float = 10.0,
        send_ping: bool = True,
        host_key: asyncssh.SSHKey | None = None,
        channel_target: bytes | None = None,
        config_delay: float = 0.0,
    ) -> None:
        self.users = users
        """name -> (password, regex of allowed ``R:<host>:<port>``)."""
        self.config_timeout = config_timeout
        self.send_ping = send_ping
        self.channel_target = channel_target
        self.config_delay = config_delay
        """Seconds to sit on a valid config before answering (lets tests act while open() is pending)."""
        """Misbehaving-server knob: ask the client for this host:port instead of the configured remote."""
        self.host_key = host_key or asyncssh.generate_private_key("ecdsa-sha2-nistp256")
        self.records = Records()
        self.sessions: set[_Session] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tls = False

    @property
    def fingerprint(self) -> str:
        """Computed here the way chisel does (ccrypto.FingerprintKey), independently of edge.tunnel."""
        return base64.b64encode(hashlib.sha256(self.host_key.public_data).digest()).decode()

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower()
        protocol = request.headers.get("Sec-WebSocket-Protocol")
        if upgrade == "websocket":
            self.records.upgrades.append(protocol)
            if protocol == "chisel-v3":
                ws = web.WebSocketResponse(protocols=(), autoping=True, max_msg_size=0)
                await ws.prepare(request)
                session = _Session(self, ws)
                self.sessions.add(session)
                try:
                    await session.run()
                finally:
                    await session.shutdown()
                    self.sessions.discard(session)
                    await ws.close()
                return ws
        return web.Response(status=404, text="Not found")

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 (plain HTTP, or HTTPS when given a server context: wss://)."""
        self.tls = ssl_context is not None
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def drop_all(self) -> None:
        """Server-side drop: close every client's SSH connection and stop its listeners."""
        for session in list(self.sessions):
            if session.conn is not None:
                session.conn.abort()
            await session.shutdown()
            with contextlib.suppress(Exception):
                await session.ws.close()

    async def stop(self) -> None:
        await self.drop_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
