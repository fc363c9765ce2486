"""Reverse tunnel over standard SSH remote port forwarding (``ssh -R``), for a plain SSH server.

An alternative to chisel when the tunnel end is an ordinary sshd: the server listens on the port from
the poll response and each connection there comes back as a ``forwarded-tcpip`` channel that asyncssh
pipes to the agent API. The host key is checked against the same SHA-256 fingerprint form as chisel's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import asyncssh

from edge.tunnel.base import TunnelConfig, TunnelConnectError, TunnelRefusedError
from edge.tunnel.sshbase import HostKeyChecker, SSHConnectionTunnel, client_options

DEFAULT_SSH_PORT = 22
DEFAULT_BIND_HOST = "127.0.0.1"
"""Server-side listen address; loopback, since only the server's own process should reach the agent."""
KEEPALIVE_COUNT_MAX = 3


def split_host_port(server: str, default_port: int = DEFAULT_SSH_PORT) -> tuple[str, int]:
    """(host, port) of ``host``, ``host:port``, ``[v6]:port`` or ``ssh://host:port``."""
    text = server.strip().removeprefix("ssh://").rstrip("/")
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        port_text = tail.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise TunnelConnectError(f"SSH server address {server!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TunnelConnectError(f"SSH server address {server!r} has a bad port")
    return host, int(port_text)


class SshTunnel(SSHConnectionTunnel):
    """Server port ``remote_port`` -> ``local_host:local_port`` via ``tcpip-forward``.

    Authenticates with the config's user/password, or with ``client_keys`` (private key paths or
    asyncssh keys) when given; asyncssh's keepalive (``keepalive@openssh.com``) detects dead servers.
    """

    transport_name = "ssh"

    def __init__(
        self,
        config: TunnelConfig,
        *,
        client_keys: Sequence[str | os.PathLike[str] | asyncssh.SSHKey] | None = None,
    ) -> None:
        super().__init__(config)
        self._client_keys = list(client_keys) if client_keys else None

    async def _connect(
        self, checker: HostKeyChecker, _resources: contextlib.AsyncExitStack
    ) -> asyncssh.SSHClientConnection:
        host, port = split_host_port(self.config.server)
        return await asyncssh.connect(
            host,
            port,
            username=self.config.username,
            password=self.config.password or None,
            client_keys=self._client_keys,
            client_factory=lambda: checker,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
            **client_options(),
        )

    async def _setup(self, conn: asyncssh.SSHClientConnection) -> None:
        bind = self.config.remote_bind_host or DEFAULT_BIND_HOST
        try:
            await conn.forward_remote_port(
                bind, self.config.remote_port, self.config.local_host, self.config.local_port
            )
        except asyncssh.ChannelListenError as exc:
            raise TunnelRefusedError(
                f"SSH server refused to listen on {bind}:{self.config.remote_port}: {exc}"
            ) from None
