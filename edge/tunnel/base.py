"""The reverse-tunnel interface the Edge poller drives, its configuration and its errors.

A tunnel makes a port on the tunnel server (Portainer's side) lead to the agent API, so Portainer can reach
an agent that only makes outbound connections. The poller opens one when the status says REQUIRED and closes
it after inactivity; transports (chisel over WebSocket, plain SSH remote forwarding) are interchangeable.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TunnelConfig:
    """Everything one tunnel needs; built from the Edge key and the poll response."""

    server: str
    """Tunnel server: ``host:port`` or a ws(s)://, http(s):// URL (chisel); ``host:port`` (ssh)."""
    remote_port: int
    """Port the server listens on for Portainer (the poll response's ``port``)."""
    local_host: str
    """Where connections through the tunnel go: the agent API host..."""
    local_port: int
    """...and port."""
    username: str
    password: str = field(repr=False)
    fingerprint: str
    """Server host key: base64 SHA-256 of its SSH wire public key (legacy MD5 colon-hex accepted)."""
    connect_timeout: float = 30.0
    """Bound on connecting + SSH handshake + forwarding setup."""
    keepalive_interval: float = 25.0
    """Seconds between the client's own keep-alive requests; 0 disables them."""
    proxy: str | None = None
    """HTTP proxy URL for the chisel WebSocket; None = from HTTPS_PROXY / HTTP_PROXY (like the Go agent)."""
    remote_bind_host: str | None = None
    """Server-side bind address; None = the transport's default (chisel 0.0.0.0, ssh 127.0.0.1)."""


class TunnelError(Exception):
    """Opening the tunnel failed; the message is meant for the log line."""


class TunnelConnectError(TunnelError):
    """The server could not be reached or the handshake broke off (network, proxy, HTTP, timeout)."""


class FingerprintMismatchError(TunnelError):
    """The server's host key is not the one in the Edge key: refused before any credentials are sent."""


class TunnelAuthError(TunnelError):
    """The server rejected the credentials."""


class TunnelRefusedError(TunnelError):
    """Authenticated, but the server refused the port forwarding (message carries the server's reason)."""


class ReverseTunnel(abc.ABC):
    """One reverse tunnel; ``open`` again after it closed to reconnect (with fresh credentials if needed)."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, authenticate and set up the forwarding; raises TunnelError. No-op when already open."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Tear the tunnel down and wait until it is; safe to call at any time, also twice."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """True from a successful open() until the connection ends (either side)."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Return once the tunnel is closed (at once when not open); lets the poller notice drops."""
