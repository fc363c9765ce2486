"""Chisel (protocol ``chisel-v3``) reverse-tunnel client, the transport Portainer's Edge tunnel server speaks.

Wire protocol, as read in jpillora/chisel and checked against a real chisel 1.10 server (docs/edge.md):

1. HTTP(S) WebSocket upgrade asking for subprotocol ``chisel-v3`` (client/client_connect.go). The server
   answers 101 without echoing the subprotocol, so we do not require it back. Binary messages carry an
   SSH byte stream (share/cnet/conn_ws.go).
2. SSH client handshake over that stream; password auth; the server's host key must match the fingerprint.
3. Global request ``config`` (want-reply) whose payload is raw JSON ``{"Version", "Remotes": [...]}``
   (share/settings/config.go, remote.go; ports are strings). A failure reply carries the reason as payload
   (server/server_handler.go). Portainer allows the user only ``^R:0.0.0.0:<port>$``.
4. For each connection on its side the server opens a channel of type ``chisel`` whose extra data is the
   raw ``host:port`` we asked for (share/tunnel/tunnel_in_proxy.go); we pipe it to the agent API.
   The server may send ``ping`` global requests, answered with ``pong`` (share/tunnel/tunnel_out_ssh.go).

asyncssh 2.24 workarounds (pinned: pyproject allows <2.25; tests/edge/test_chisel.py checks these hooks):

* Server version line: chisel sends ``SSH-chisel-v3-server`` (server/server.go ServerVersion) and asyncssh
  only accepts ``SSH-2.0-``/``SSH-1.99-``. ``_ServerVersionFixup`` rewrites the line on the way in and then
  restores ``SSHConnection._server_version`` to the original, because the key exchange hash must cover
  the string the server actually sent (the server signs over it).
* asyncssh has no public hook for custom channel types or global requests; it dispatches to
  ``_process_<type>_open`` / ``_process_<name>_global_request`` looked up with getattr on the connection,
  so ``_install_chisel_handlers`` sets those on the connection instance. Sending ``config``/``ping`` uses
  ``SSHConnection._make_global_request`` (raw payload, returns the reply packet).

The connection is handed to ``asyncssh.connect`` through its ``tunnel=`` argument: any object with
``create_connection(session_factory, host, port)`` will do, which lets asyncssh run over the WebSocket
with all its normal option handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl as ssl_module
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncssh
from asyncssh.constants import MSG_REQUEST_SUCCESS, OPEN_ADMINISTRATIVELY_PROHIBITED
from asyncssh.packet import SSHPacket

from agent.netaddr import host_port
from edge.tunnel.base import TunnelConfig, TunnelConnectError, TunnelRefusedError
from edge.tunnel.sshbase import HostKeyChecker, SSHConnectionTunnel, client_options
from edge.tunnel.websocket import WebSocketTransport

log = logging.getLogger(__name__)

CHISEL_PROTOCOL = "chisel-v3"
CLIENT_VERSION = "keelson"
"""Sent as ``Version`` in the config request; the server only logs it when it differs from its own."""
DEFAULT_BIND_HOST = "0.0.0.0"
"""Chisel's default LocalHost; Portainer's ACL ``^R:0.0.0.0:<port>$`` requires exactly this."""
PING_TIMEOUT = 15.0
PINNED_ASYNCSSH = "2.24."
"""The workarounds below use asyncssh internals verified for this release series only."""


def websocket_url(server: str) -> str:
    """ws(s):// URL for a server given as host:port or an http(s)/ws(s) URL (chisel maps http->ws)."""
    text = server.strip()
    if "://" not in text:
        text = "ws://" + text
    parts = urlsplit(text)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise TunnelConnectError(f"tunnel server address {server!r} is not host:port or a ws(s)/http(s) URL")
    return parts._replace(scheme=scheme, path=parts.path or "/").geturl()


def proxy_from_env(url: str) -> str | None:
    """The Go agent's rule: HTTPS_PROXY, else HTTP_PROXY, for ws:// and wss:// alike; NO_PROXY honoured.

    aiohttp's own trust_env lookup keys on the URL scheme (WS_PROXY/WSS_PROXY) and would miss these.
    """
    host = urlsplit(url).hostname or ""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        value = os.environ.get(name)
        if value:
            if urllib.request.proxy_bypass(host):
                return None
            return value
    return None


def chisel_config(config: TunnelConfig, version: str = CLIENT_VERSION) -> dict[str, Any]:
    """The ``config`` request body for the one remote R:<bind>:<remote_port>:<agent host>:<agent port>."""
    target = host_port(config.local_host, config.local_port)
    remote_host, _, remote_port = target.rpartition(":")
    return {
        "Version": version,
        "Remotes": [
            {
                "LocalHost": config.remote_bind_host or DEFAULT_BIND_HOST,
                "LocalPort": str(config.remote_port),
                "LocalProto": "tcp",
                "RemoteHost": remote_host,
                "RemotePort": remote_port,
                "RemoteProto": "tcp",
                "Socks": False,
                "Reverse": True,
                "Stdio": False,
            }
        ],
    }


class _ServerVersionFixup(asyncio.Protocol):
    """Sits between the WebSocket transport and asyncssh to make chisel's version line acceptable.

    See the module docstring; relies on asyncssh processing the version line synchronously inside
    data_received, so the recorded version is restored before any key exchange packet is handled.
    """

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        self._pending = b""
        self._done = False

    def data_received(self, data: bytes) -> None:
        if self._done:
            self._conn.data_received(data)
            return
        self._pending += data
        while not self._done:
            idx = self._pending.find(b"\n")
            if idx < 0:
                if len(self._pending) > 8192:  # let asyncssh reject the oversized banner
                    self._done = True
                    self._conn.data_received(self._pending)
                    self._pending = b""
                return
            line, self._pending = self._pending[: idx + 1], self._pending[idx + 1 :]
            bare = line.rstrip(b"\r\n")
            if not bare.startswith(b"SSH-"):
                self._conn.data_received(line)  # pre-version banner line; asyncssh skips it
                continue
            self._done = True
            if bare.startswith((b"SSH-2.0-", b"SSH-1.99-")):
                self._conn.data_received(line)
            else:
                self._conn.data_received(b"SSH-2.0-" + bare[4:] + b"\r\n")
                self._conn._server_version = bare  # the kex hash must use what the server sent
                self._conn.set_extra_info(server_version=bare.decode("ascii", "replace"))
        rest, self._pending = self._pending, b""
        if rest:
            self._conn.data_received(rest)

    def eof_received(self) -> bool | None:
        self._conn.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()


def _install_chisel_handlers(conn: asyncssh.SSHClientConnection, target_host: str, target_port: int) -> None:
    """Accept ``chisel`` channels to our one target (piped with half-close) and answer ``ping``."""
    expected = host_port(target_host, target_port).encode()

    def open_chisel(packet: SSHPacket) -> tuple[asyncssh.SSHTCPChannel[bytes], Any]:
        requested = packet.get_remaining_payload()
        if requested != expected:
            log.warning("tunnel server asked for %r, only %r is forwarded", requested, expected)
            raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, "destination not allowed")
        chan: asyncssh.SSHTCPChannel[bytes] = conn.create_tcp_channel()
        chan.set_inbound_peer_names(target_host, target_port, "", 0)
        # forward_connection pipes both ways, propagating EOF (half-close) and flow control.
        return chan, conn.forward_connection(target_host, target_port)

    def ping(_packet: SSHPacket) -> None:
        conn._report_global_response(b"pong")

    setattr(conn, "_process_chisel_open", open_chisel)  # noqa: B010 - asyncssh looks these up by name
    setattr(conn, "_process_ping_global_request", ping)  # noqa: B010


class _WebSocketConnector:
    """The object passed as asyncssh ``tunnel=``: builds the SSH connection on an open WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, target_host: str, target_port: int) -> None:
        self._ws = ws
        self._target = (target_host, target_port)
        self.transport: WebSocketTransport | None = None

    async def create_connection(
        self, session_factory: Callable[[], asyncssh.SSHClientConnection], _host: str, _port: int
    ) -> tuple[WebSocketTransport, asyncssh.SSHClientConnection]:
        conn = session_factory()
        _install_chisel_handlers(conn, *self._target)
        transport = WebSocketTransport(self._ws, _ServerVersionFixup(conn))
        self.transport = transport
        conn.connection_made(transport)
        transport.start()
        return transport, conn

    async def aclose(self) -> None:
        """Close the WebSocket, giving a pending SSH disconnect a moment to go out."""
        transport = self.transport
        if transport is None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            return
        transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(6.0):
                await transport.closed.wait()


class ChiselTunnel(SSHConnectionTunnel):
    """Reverse tunnel to a chisel server: server port ``remote_port`` -> ``local_host:local_port``."""

    transport_name = "chisel"

    def __init__(self, config: TunnelConfig, *, ssl: ssl_module.SSLContext | bool = True) -> None:
        super().__init__(config)
        self._ssl = ssl
        if not asyncssh.__version__.startswith(PINNED_ASYNCSSH):
            log.warning(
                "asyncssh %s is not the %sx series the chisel workarounds were verified with",
                asyncssh.__version__,
                PINNED_ASYNCSSH,
            )

    async def _connect(
        self, checker: HostKeyChecker, resources: contextlib.AsyncExitStack
    ) -> asyncssh.SSHClientConnection:
        url = websocket_url(self.config.server)
        proxy = self.config.proxy or proxy_from_env(url)
        session = aiohttp.ClientSession(trust_env=True)
        resources.push_async_callback(session.close)
        ws = await session.ws_connect(
            url,
            protocols=(CHISEL_PROTOCOL,),
            proxy=proxy,
            ssl=self._ssl,
            autoping=True,
            heartbeat=None,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
        connector = _WebSocketConnector(ws, self.config.local_host, self.config.local_port)
        resources.push_async_callback(connector.aclose)  # runs before session.close (LIFO)
        parts = urlsplit(url)
        return await asyncssh.connect(
            parts.hostname or "",
            parts.port or (443 if parts.scheme == "wss" else 80),
            tunnel=connector,
            username=self.config.username,
            password=self.config.password,
            client_keys=None,
            preferred_auth="password",
            client_factory=lambda: checker,
            **client_options(),
        )

    async def _setup(self, conn: asyncssh.SSHClientConnection) -> None:
        body = json.dumps(chisel_config(self.config), separators=(",", ":")).encode()
        pkttype, packet = await conn._make_global_request(b"config", body)
        if pkttype != MSG_REQUEST_SUCCESS:
            reason = packet.get_remaining_payload().decode("utf-8", "replace").strip()
            reason = reason or "no reason given"
            raise TunnelRefusedError(f"chisel server refused the tunnel config: {reason}")

    async def _keepalive_loop(self, conn: asyncssh.SSHClientConnection) -> None:
        """Chisel's own keep-alive (``ping`` global request): a server that stops answering is dropped."""
        interval = self.config.keepalive_interval
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(max(PING_TIMEOUT, interval)):
                    await conn._make_global_request(b"ping")
            except TimeoutError:
                log.warning("chisel server %s stopped answering pings; dropping tunnel", self.config.server)
                conn.abort()
                return
