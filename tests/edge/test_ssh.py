"""SshTunnel: remote port forwarding through Debian's real sshd, and password auth via an asyncssh server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re

import aiohttp
import asyncssh
import pytest

from edge.tunnel.base import FingerprintMismatchError, TunnelAuthError, TunnelConfig, TunnelRefusedError
from edge.tunnel.fingerprint import sha256_fingerprint
from edge.tunnel.ssh import SshTunnel, split_host_port
from tests.edge.conftest import AgentAPI, Sshd, blob, free_port

pytestmark = pytest.mark.edge


def sshd_config(sshd: Sshd, api: AgentAPI, **overrides: object) -> TunnelConfig:
    values: dict[str, object] = {
        "server": f"127.0.0.1:{sshd.port}",
        "remote_port": free_port(),
        "local_host": api.host,
        "local_port": api.port,
        "username": sshd.user,
        "password": "",
        "fingerprint": sshd.fingerprint,
        "connect_timeout": 10.0,
        "keepalive_interval": 0.0,
    }
    values.update(overrides)
    return TunnelConfig(**values)  # type: ignore[arg-type]


async def test_openssh_remote_forward_reaches_agent_api(sshd: Sshd, agent_api: AgentAPI) -> None:
    config = sshd_config(sshd, agent_api)
    tunnel = SshTunnel(config, client_keys=[sshd.client_key])
    await tunnel.open()
    try:
        assert tunnel.is_open
        server_key = tunnel._conn.get_server_host_key() if tunnel._conn else None
        assert server_key is not None
        assert sha256_fingerprint(server_key.public_data) == sshd.fingerprint  # same digest as ssh-keygen -l
        base = f"http://127.0.0.1:{config.remote_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/ping") as resp:
                assert resp.status == 204
            payload = blob(1024 * 1024)
            async with http.post(f"{base}/echo", data=payload) as resp:
                assert await resp.read() == payload
    finally:
        await tunnel.close()
    assert not tunnel.is_open
    for _ in range(50):  # sshd drops the listener once the session is gone
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", config.remote_port)
        except OSError:
            break
        writer.close()
        await asyncio.sleep(0.05)
    else:
        pytest.fail("sshd still listens after the tunnel closed")


async def test_openssh_wrong_host_key_refused(sshd: Sshd, agent_api: AgentAPI) -> None:
    wrong = base64.b64encode(hashlib.sha256(b"some other key").digest()).decode()
    tunnel = SshTunnel(sshd_config(sshd, agent_api, fingerprint=wrong), client_keys=[sshd.client_key])
    with pytest.raises(FingerprintMismatchError, match=re.escape(sshd.fingerprint)):
        await tunnel.open()
    assert not tunnel.is_open


async def test_openssh_busy_port_refused(sshd: Sshd, agent_api: AgentAPI) -> None:
    busy = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        tunnel = SshTunnel(sshd_config(sshd, agent_api, remote_port=port), client_keys=[sshd.client_key])
        with pytest.raises(TunnelRefusedError, match=f"127.0.0.1:{port}"):
            await tunnel.open()
        assert not tunnel.is_open
    finally:
        busy.close()


async def test_password_auth_and_forwarding_with_asyncssh_server(agent_api: AgentAPI) -> None:
    """The poll response carries user:password; check that path against a password-only SSH server."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    opened: list[tuple[str, int]] = []

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return (username, password) == ("edge", "s3cret")

        def server_requested(self, listen_host: str, listen_port: int) -> bool:
            opened.append((listen_host, listen_port))
            return True

    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], server_factory=Server, gss_host=None
    )
    port = acceptor.sockets[0].getsockname()[1]
    fingerprint = base64.b64encode(hashlib.sha256(host_key.public_data).digest()).decode()
    base_values: dict[str, object] = {
        "server": f"127.0.0.1:{port}",
        "remote_port": free_port(),
        "local_host": agent_api.host,
        "local_port": agent_api.port,
        "username": "edge",
        "password": "s3cret",
        "fingerprint": fingerprint,
        "connect_timeout": 10.0,
    }
    try:
        config = TunnelConfig(**base_values)  # type: ignore[arg-type]
        tunnel = SshTunnel(config)
        await tunnel.open()
        try:
            assert opened == [("127.0.0.1", config.remote_port)]
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{config.remote_port}/ping") as resp,
            ):
                assert resp.status == 204
        finally:
            await tunnel.close()

        bad = TunnelConfig(**{**base_values, "password": "nope"})  # type: ignore[arg-type]
        with pytest.raises(TunnelAuthError):
            await SshTunnel(bad).open()
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def test_split_host_port() -> None:
    assert split_host_port("host") == ("host", 22)
    assert split_host_port("host:2222") == ("host", 2222)
    assert split_host_port("[::1]:2222") == ("::1", 2222)
    assert split_host_port("ssh://h:23") == ("h", 23)
