"""ChiselTunnel against the chisel-protocol test server: traffic, refusals, drops, proxy, pinned hooks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncssh
import pytest

from agent.tls import self_signed_pem
from edge.tunnel.base import (
    FingerprintMismatchError,
    TunnelAuthError,
    TunnelConnectError,
    TunnelError,
    TunnelRefusedError,
)
from edge.tunnel.chisel import (
    ChiselTunnel,
    _ServerVersionFixup,
    chisel_config,
    proxy_from_env,
    websocket_url,
)
from edge.tunnel.fingerprint import md5_fingerprint
from tests.edge.chisel_server import ChiselTestServer
from tests.edge.conftest import AgentAPI, ChiselStand, blob, eventually, free_port

pytestmark = pytest.mark.edge

FIVE_MB = 5 * 1024 * 1024


async def test_asyncssh_hooks_still_exist() -> None:
    """The workarounds are pinned to asyncssh 2.24; fail loudly when an upgrade moves its internals."""
    assert asyncssh.__version__.startswith("2.24."), asyncssh.__version__
    conn_cls = asyncssh.connection.SSHConnection
    for name in ("_make_global_request", "_report_global_response", "_recv_version", "get_hash_prefix"):
        assert hasattr(conn_cls, name), name
    assert hasattr(asyncssh.SSHClientConnection, "forward_connection")
    assert hasattr(asyncssh.SSHClientConnection, "create_tcp_channel")


async def test_tunnel_carries_requests_and_big_bodies(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api))
    assert not tunnel.is_open
    await tunnel.wait_closed()  # never opened: returns at once
    await tunnel.open()
    try:
        assert tunnel.is_open
        base = f"http://127.0.0.1:{chisel.port}"
        async with aiohttp.ClientSession() as http:
            async with http.head(f"{base}/ping") as resp:  # what Portainer sends every 10 s
                assert resp.status == 204
            payload = blob(FIVE_MB)
            async with http.post(f"{base}/echo", data=io.BytesIO(payload)) as resp:  # 5 MB up and 5 MB down
                assert resp.status == 200
                body = await resp.read()
            assert len(body) == FIVE_MB
            assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
            async with http.get(f"{base}/blob", params={"size": str(FIVE_MB)}) as resp:
                assert await resp.read() == payload
            # several connections at once, each its own chisel channel
            results = await asyncio.gather(*(http.get(f"{base}/ping") for _ in range(8)))
            assert [r.status for r in results] == [204] * 8
            for r in results:
                r.release()
        records = chisel.server.records
        assert records.upgrades == ["chisel-v3"]
        assert records.auth_attempts == [(chisel.user, True)]
        assert records.configs == [
            {
                "Version": "keelson",
                "Remotes": [
                    {
                        "LocalHost": "0.0.0.0",
                        "LocalPort": str(chisel.port),
                        "LocalProto": "tcp",
                        "RemoteHost": agent_api.host,
                        "RemotePort": str(agent_api.port),
                        "RemoteProto": "tcp",
                        "Socks": False,
                        "Reverse": True,
                        "Stdio": False,
                    }
                ],
            }
        ]
        await eventually(lambda: records.ping_replies == [(True, b"pong")])  # server ping answered
        assert tunnel._conn is not None
        assert tunnel._conn.get_extra_info("server_version") == "SSH-chisel-v3-server"
    finally:
        await tunnel.close()
    assert not tunnel.is_open
    await tunnel.close()  # twice is fine
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", chisel.port)


async def test_half_close_is_propagated(chisel: ChiselStand) -> None:
    """A client that shuts down its sending side still gets the full answer, then EOF."""

    async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF arrives through the tunnel
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo_until_eof, "127.0.0.1", 0)
    api = AgentAPI("127.0.0.1", target.sockets[0].getsockname()[1])
    tunnel = ChiselTunnel(chisel.config(api))
    await tunnel.open()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", chisel.port)
        payload = blob(300_000)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer == payload[::-1]
        writer.close()
    finally:
        await tunnel.close()
        target.close()


async def test_only_the_configured_target_is_dialled(
    agent_api: AgentAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """A server asking for another host:port (chisel would dial anything) gets the channel refused."""
    port = free_port()
    server = ChiselTestServer({"u": ("p", f"^R:0.0.0.0:{port}$")}, channel_target=b"127.0.0.1:22")
    await server.start()
    tunnel = ChiselTunnel(ChiselStand(server, port, "u", "p").config(agent_api))
    try:
        await tunnel.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ping HTTP/1.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert "only b'127.0.0.1:" in caplog.text
        assert tunnel.is_open  # a refused channel does not end the tunnel
    finally:
        await tunnel.close()
        await server.stop()


async def test_close_while_opening(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    chisel.server.config_delay = 0.5
    tunnel = ChiselTunnel(chisel.config(agent_api))
    opening = asyncio.create_task(tunnel.open())
    await eventually(lambda: chisel.server.records.configs)  # authenticated, config pending
    await tunnel.close()
    with pytest.raises(TunnelError, match="closed while it was being opened"):
        await opening
    assert not tunnel.is_open


async def test_cancelled_open_cleans_up(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    chisel.server.config_delay = 5.0
    tunnel = ChiselTunnel(chisel.config(agent_api))
    opening = asyncio.create_task(tunnel.open())
    await eventually(lambda: chisel.server.records.configs)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert not tunnel.is_open
    await eventually(lambda: not chisel.server.sessions)  # the server saw the connection go away
    chisel.server.config_delay = 0.0
    await tunnel.open()  # and the tunnel is still usable
    await tunnel.close()


def test_version_line_fixup_handles_split_reads() -> None:
    """chisel's ``SSH-chisel-v3-server`` reaches asyncssh as an SSH-2.0 line; the original is restored."""

    class FakeConn:
        def __init__(self) -> None:
            self.calls: list[bytes] = []
            self._server_version = b""
            self.extra: dict[str, str] = {}

        def data_received(self, data: bytes) -> None:
            self.calls.append(data)
            if data.startswith(b"SSH-"):
                self._server_version = data.rstrip(b"\r\n")

        def set_extra_info(self, **kwargs: str) -> None:
            self.extra.update(kwargs)

    conn = FakeConn()
    fixup = _ServerVersionFixup(conn)  # type: ignore[arg-type]
    stream = b"SSH-chisel-v3-server\r\n\x00\x00\x01\x2ckexinit..."
    for i in range(len(stream)):
        fixup.data_received(stream[i : i + 1])
    assert conn.calls[0] == b"SSH-2.0-chisel-v3-server\r\n"
    assert conn._server_version == b"SSH-chisel-v3-server"
    assert conn.extra["server_version"] == "SSH-chisel-v3-server"
    assert b"".join(conn.calls[1:]) == stream[len(b"SSH-chisel-v3-server\r\n") :]

    plain = FakeConn()
    fixup = _ServerVersionFixup(plain)  # type: ignore[arg-type]
    fixup.data_received(b"SSH-2.0-OpenSSH_9.2\r\nrest")
    assert plain.calls == [b"SSH-2.0-OpenSSH_9.2\r\n", b"rest"]


async def test_client_keepalive_pings(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api, keepalive_interval=0.05))
    await tunnel.open()
    try:
        await eventually(lambda: chisel.server.records.client_pings >= 2)
        assert tunnel.is_open
    finally:
        await tunnel.close()


async def test_wrong_fingerprint_refused_before_auth(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    other = ChiselTestServer({}).fingerprint  # a different, valid key
    tunnel = ChiselTunnel(chisel.config(agent_api, fingerprint=other))
    with pytest.raises(FingerprintMismatchError) as err:
        await tunnel.open()
    message = str(err.value)
    assert chisel.server.fingerprint in message and other in message
    assert "refusing to authenticate" in message
    assert chisel.server.records.auth_attempts == []  # the password never left
    assert chisel.server.records.configs == []
    assert not tunnel.is_open


async def test_legacy_md5_fingerprint(
    chisel: ChiselStand, agent_api: AgentAPI, caplog: pytest.LogCaptureFixture
) -> None:
    md5 = md5_fingerprint(chisel.server.host_key.public_data)
    tunnel = ChiselTunnel(chisel.config(agent_api, fingerprint=md5))
    with caplog.at_level(logging.WARNING, logger="keelson.edge.tunnel"):
        await tunnel.open()
    await tunnel.close()
    assert "deprecated MD5" in caplog.text
    assert chisel.server.fingerprint in caplog.text  # tells the operator the new form

    wrong = ":".join(["00"] * 16)
    with pytest.raises(FingerprintMismatchError):
        await ChiselTunnel(chisel.config(agent_api, fingerprint=wrong)).open()


async def test_wrong_password_refused(
    chisel: ChiselStand, agent_api: AgentAPI, caplog: pytest.LogCaptureFixture
) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api, password="wrong"))
    with caplog.at_level(logging.WARNING, logger="keelson"), pytest.raises(TunnelAuthError, match=chisel.user):
        await tunnel.open()
    assert chisel.server.records.auth_attempts == [(chisel.user, False)]
    assert not tunnel.is_open
    assert "EDGE_TUNNEL_FAILED" in caplog.text


async def test_port_not_granted_is_refused_with_server_reason(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    other_port = free_port()
    tunnel = ChiselTunnel(chisel.config(agent_api, remote_port=other_port))
    with pytest.raises(TunnelRefusedError, match=f"access to 'R:0.0.0.0:{other_port}' denied"):
        await tunnel.open()
    assert not tunnel.is_open


async def test_server_drop_then_reopen(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api))
    await tunnel.open()
    first_conn = tunnel._conn
    await chisel.server.drop_all()
    await asyncio.wait_for(tunnel.wait_closed(), 5)
    assert not tunnel.is_open
    await tunnel.open()
    try:
        assert tunnel.is_open and tunnel._conn is not first_conn
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{chisel.port}/ping") as resp:
            assert resp.status == 204
    finally:
        await tunnel.close()
    assert len(chisel.server.records.configs) == 2


async def test_server_closes_when_no_config_arrives(agent_api: AgentAPI) -> None:
    """The stand-in enforces chisel's rule (first request = config, in time); a silent client is dropped."""

    class SilentTunnel(ChiselTunnel):
        async def _setup(self, conn: asyncssh.SSHClientConnection) -> None:
            return None

    port = free_port()
    server = ChiselTestServer({"u": ("p", f"^R:0.0.0.0:{port}$")}, config_timeout=0.3)
    await server.start()
    try:
        stand = ChiselStand(server, port, "u", "p")
        tunnel = SilentTunnel(stand.config(agent_api))
        await tunnel.open()
        await asyncio.wait_for(tunnel.wait_closed(), 5)
        assert server.records.timeouts == 1
    finally:
        await server.stop()


async def test_subprotocol_required_and_not_echoed(chisel: ChiselStand) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(chisel.server.url, protocols=("chisel-v2",))
        assert err.value.status == 404
        ws = await http.ws_connect(chisel.server.url, protocols=("chisel-v3",))
        assert ws.protocol is None  # 101 without Sec-WebSocket-Protocol, as the real server does
        await ws.close()


async def test_not_a_chisel_server(agent_api: AgentAPI) -> None:
    config = ChiselStand(ChiselTestServer({}), 1, "u", "p").config(agent_api)
    tunnel = ChiselTunnel(
        type(config)(**{**config.__dict__, "server": f"{agent_api.host}:{agent_api.port}"})
    )
    with pytest.raises(TunnelConnectError, match="HTTP 40"):
        await tunnel.open()


async def test_unreachable_server(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api, server=f"127.0.0.1:{free_port()}"))
    with pytest.raises(TunnelConnectError, match="cannot reach"):
        await tunnel.open()


async def test_invalid_fingerprint_fails_before_connecting(chisel: ChiselStand, agent_api: AgentAPI) -> None:
    tunnel = ChiselTunnel(chisel.config(agent_api, fingerprint="nonsense"))
    with pytest.raises(TunnelError, match="cannot verify"):
        await tunnel.open()
    assert chisel.server.records.upgrades == []


async def test_http_proxy_from_environment(
    chisel: ChiselStand, agent_api: AgentAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is used for the WebSocket (the Go agent: HTTPS_PROXY, else HTTP_PROXY)."""
    seen: list[bytes] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        first, rest = head.split(b"\r\n", 1)
        method, target, version = first.split(b" ")
        seen.append(first)
        if method == b"CONNECT":
            host, _, port = target.decode().rpartition(":")
            up_r, up_w = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute-form request: forward in origin-form
            url = urlsplit(target.decode())
            up_r, up_w = await asyncio.open_connection(url.hostname, url.port)
            up_w.write(b" ".join([method, (url.path or "/").encode(), version]) + b"\r\n" + rest)
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        writer.close()
        up_w.close()

    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy_server.sockets[0].getsockname()[1]}"
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    tunnel = ChiselTunnel(chisel.config(agent_api))
    try:
        await tunnel.open()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{chisel.port}/ping") as resp:
            assert resp.status == 204
        assert len(seen) == 1 and str(chisel.server.port).encode() in seen[0]
    finally:
        await tunnel.close()
        proxy_server.close()


async def test_wss_with_verified_certificate(agent_api: AgentAPI, tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed_pem(["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    port = free_port()
    server = ChiselTestServer({"u": ("p", f"^R:0.0.0.0:{port}$")})
    await server.start(ssl_context=server_ctx)
    try:
        config = ChiselStand(server, port, "u", "p").config(agent_api)
        assert config.server.startswith("wss://")
        with pytest.raises(TunnelConnectError, match="certificate verify failed"):
            await ChiselTunnel(config).open()  # verification is on by default
        assert server.records.upgrades == []

        tunnel = ChiselTunnel(config, ssl=ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
        await tunnel.open()
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/ping") as resp:
                assert resp.status == 204
        finally:
            await tunnel.close()
    finally:
        await server.stop()


def test_websocket_url() -> None:
    assert websocket_url("tunnel.example:8000") == "ws://tunnel.example:8000/"
    assert websocket_url("http://t:8000") == "ws://t:8000/"
    assert websocket_url("https://t") == "wss://t/"
    assert websocket_url("wss://t:9443/chisel") == "wss://t:9443/chisel"
    with pytest.raises(TunnelConnectError):
        websocket_url("ftp://t:21")


def test_proxy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_from_env("ws://t:8000/") is None
    monkeypatch.setenv("HTTP_PROXY", "http://p1:3128")
    assert proxy_from_env("wss://t:8000/") == "http://p1:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://p2:3128")
    assert proxy_from_env("ws://t:8000/") == "http://p2:3128"  # HTTPS_PROXY wins, for ws:// too
    monkeypatch.setenv("NO_PROXY", "t")
    assert proxy_from_env("ws://t:8000/") is None


def test_chisel_config_ipv6_target(chisel: ChiselStand) -> None:
    config = chisel.config(AgentAPI("fd00::5", 9001))
    remote = chisel_config(config)["Remotes"][0]
    assert (remote["RemoteHost"], remote["RemotePort"]) == ("[fd00::5]", "9001")
