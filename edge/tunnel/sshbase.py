"""Lifecycle shared by tunnels that ride on one asyncssh client connection (chisel and plain SSH).

Both transports differ only in how the connection is made and how the forwarding is requested; opening,
host key checking, error mapping, drop detection and closing are the same and live here.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import asyncssh

from agent.errors import Code, log_failure
from agent.tasks import cancel, spawn
from edge.tunnel.base import (
    FingerprintMismatchError,
    ReverseTunnel,
    TunnelAuthError,
    TunnelConfig,
    TunnelConnectError,
    TunnelError,
)
from edge.tunnel.fingerprint import (
    InvalidFingerprintError,
    fingerprint_matches,
    sha256_fingerprint,
    validate_fingerprint,
)

log = logging.getLogger(__name__)


class HostKeyChecker(asyncssh.SSHClient):
    """asyncssh client callbacks that accept exactly the host key named by the fingerprint.

    asyncssh calls ``validate_host_public_key`` during key exchange, so a mismatch ends the connection
    before any user authentication is attempted; the seen fingerprint is kept for the error message.
    """

    def __init__(self, expected: str) -> None:
        self.expected = expected
        self.mismatch: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        wire = key.public_data
        if fingerprint_matches(self.expected, wire):
            return True
        self.mismatch = sha256_fingerprint(wire)
        return False


def no_known_hosts(_host: str, _addr: str, _port: int | None) -> tuple[list[Any], list[Any], list[Any]]:
    """known_hosts callback trusting nothing: every key goes to HostKeyChecker, ~/.ssh is never read."""
    return [], [], []


def client_options() -> dict[str, Any]:
    """asyncssh.connect arguments that keep the user's SSH setup (config, agent, keys, GSS) out of it."""
    return {
        "config": None,
        "known_hosts": no_known_hosts,
        "agent_path": None,
        "agent_forwarding": False,
        "gss_auth": False,
        "gss_kex": False,
        "x509_trusted_certs": None,
    }


class SSHConnectionTunnel(ReverseTunnel):
    """A ReverseTunnel backed by one asyncssh client connection; subclasses connect and set up forwarding.

    Everything an attempt allocates (HTTP session, WebSocket, ...) is registered on that attempt's
    AsyncExitStack, released when the attempt fails or its connection ends, so a reopen while the previous
    connection is still being torn down cannot free the new connection's resources.
    """

    transport_name = "ssh"

    def __init__(self, config: TunnelConfig) -> None:
        super().__init__(config)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._closed: asyncio.Event | None = None
        self._closing = False
        self._close_calls = 0
        self._lock = asyncio.Lock()
        self._watchers: set[asyncio.Task[None]] = set()
        self._attempt: asyncio.Task[tuple[asyncssh.SSHClientConnection, contextlib.AsyncExitStack]] | None = None

    # to implement

    @abc.abstractmethod
    async def _connect(
        self, checker: HostKeyChecker, resources: contextlib.AsyncExitStack
    ) -> asyncssh.SSHClientConnection:
        """Reach the server and finish SSH authentication; register cleanups on ``resources``."""

    @abc.abstractmethod
    async def _setup(self, conn: asyncssh.SSHClientConnection) -> None:
        """Ask the server for the forwarding; raise TunnelError when it says no."""

    async def _keepalive_loop(self, conn: asyncssh.SSHClientConnection) -> None:
        """Optional client keep-alive, run while the connection lives; default: asyncssh's own."""

    # ReverseTunnel

    @property
    def is_open(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_closed()

    async def wait_closed(self) -> None:
        closed = self._closed
        if closed is not None:
            await closed.wait()

    async def close(self) -> None:
        self._closing = True
        self._close_calls += 1
        attempt = self._attempt
        if attempt is not None and not attempt.done():
            attempt.cancel()  # an open() in progress fails with "closed while it was being opened"
            await asyncio.wait([attempt])
        conn = self._conn
        if conn is not None:
            conn.close()
        await self.wait_closed()

    async def open(self) -> None:
        async with self._lock:
            if self.is_open:
                return
            close_calls = self._close_calls
            attempt = self._attempt = spawn(self._open_once(), "edge-tunnel-open", owned=True)
            try:
                try:
                    conn, resources = await attempt
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # our caller cancelled open(); the attempt was cancelled with it
                    raise TunnelError("tunnel closed while it was being opened") from None
                finally:
                    self._attempt = None
                if self._close_calls != close_calls:
                    conn.abort()
                    await conn.wait_closed()
                    await resources.aclose()
                    raise TunnelError("tunnel closed while it was being opened")
            except TunnelError as exc:
                log_failure(
                    Code.EDGE_TUNNEL_FAILED,
                    f"{self.transport_name} tunnel open failed: {exc}",
                    server=self.config.server,
                    remote_port=self.config.remote_port,
                )
                raise
            self._closing = False
            self._conn = conn
            self._closed = closed = asyncio.Event()
            resources.push_async_callback(self._stop_keepalive, self._start_keepalive(conn))
            watcher = spawn(self._watch(conn, closed, resources), "edge-tunnel-watch")
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            log.info(
                "%s tunnel open: %s port %d -> %s:%d",
                self.transport_name,
                self.config.server,
                self.config.remote_port,
                self.config.local_host,
                self.config.local_port,
            )

    # internals

    def _start_keepalive(self, conn: asyncssh.SSHClientConnection) -> asyncio.Task[None] | None:
        if self.config.keepalive_interval <= 0:
            return None
        return spawn(self._keepalive_loop(conn), "edge-tunnel-keepalive")

    @staticmethod
    async def _stop_keepalive(task: asyncio.Task[None] | None) -> None:
        await cancel(task)

    async def _open_once(self) -> tuple[asyncssh.SSHClientConnection, contextlib.AsyncExitStack]:
        try:
            validate_fingerprint(self.config.fingerprint)
        except InvalidFingerprintError as exc:
            raise TunnelError(f"cannot verify the tunnel server: {exc}") from None
        checker = HostKeyChecker(self.config.fingerprint)
        resources = contextlib.AsyncExitStack()
        conn: asyncssh.SSHClientConnection | None = None
        ok = False
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                conn = await self._connect(checker, resources)
                await self._setup(conn)
            ok = True
            return conn, resources
        except TunnelError:
            raise
        except asyncssh.HostKeyNotVerifiable as exc:
            if checker.mismatch is not None:
                raise FingerprintMismatchError(
                    f"tunnel server {self.config.server} host key fingerprint is {checker.mismatch}, "
                    f"expected {self.config.fingerprint}; refusing to authenticate"
                ) from None
            raise TunnelConnectError(f"host key not verifiable: {exc}") from None
        except asyncssh.PermissionDenied as exc:
            raise TunnelAuthError(
                f"tunnel server rejected the credentials of user {self.config.username!r} ({exc.reason})"
            ) from None
        except TimeoutError:
            raise TunnelConnectError(
                f"no tunnel to {self.config.server} within {self.config.connect_timeout:g}s"
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise TunnelConnectError(
                f"WebSocket upgrade to {self.config.server} refused: HTTP {exc.status} {exc.message}"
            ) from None
        except (OSError, asyncssh.Error, aiohttp.ClientError, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            raise TunnelConnectError(f"cannot reach tunnel server {self.config.server}: {detail}") from None
        finally:
            if not ok:
                if conn is not None:
                    conn.abort()
                    with contextlib.suppress(Exception):
                        await conn.wait_closed()
                await resources.aclose()

    async def _watch(
        self, conn: asyncssh.SSHClientConnection, closed: asyncio.Event, resources: contextlib.AsyncExitStack
    ) -> None:
        try:
            await conn.wait_closed()
        finally:
            try:
                await resources.aclose()
            except Exception as exc:  # cleanup trouble must not keep wait_closed() hanging
                log.debug("tunnel cleanup failed: %s", exc)
            if not self._closing and self._conn is conn:
                log_failure(
                    Code.EDGE_TUNNEL_FAILED,
                    f"{self.transport_name} tunnel closed by the server or the network",
                    server=self.config.server,
                    remote_port=self.config.remote_port,
                )
            if self._conn is conn:
                self._conn = None
            closed.set()
