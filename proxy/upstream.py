"""Where a forwarded request goes: the local engine or another agent, each with a pooled HTTP session.

Both kinds look the same to forward.py: a base URL, an aiohttp session with keep-alive connections (for plain
requests) and a way to open a raw connection (for hijacked attach/exec streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl

import aiohttp

from agent.config import DockerEndpoint
from agent.tasks import supervise
from agent.tls import docker_client_context, peer_client_context
from agent.tlsproto import open_tls_connection, shrink_client_read_buffers
from proxy.target import ApiRange

log = logging.getLogger(__name__)

FORWARD_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
"""aiohttp's client adds these when the request lacks them; a relayed request carries the caller's only."""
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=10, sock_read=None)


class Upstream:
    """One HTTP destination (engine or peer agent) reached over a pooled session."""

    name = "upstream"
    connect_timeout: float | None = None
    """Deadline for a new connection (None: the session's)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, host_header: str) -> None:
        self.base_url = base_url
        self.session = session
        self.host_header = host_header

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise NotImplementedError


class EngineUpstream(Upstream):
    """The local Docker engine, on its unix socket or on tcp:// (with the CLI's TLS files)."""

    name = "docker"

    def __init__(self, endpoint: DockerEndpoint) -> None:
        self.endpoint = endpoint
        self.ssl_context: ssl.SSLContext | None = None
        connector: aiohttp.BaseConnector
        if endpoint.is_unix:
            connector = aiohttp.UnixConnector(path=endpoint.socket_path, limit=0, keepalive_timeout=30)
            host = "docker"
        else:
            if endpoint.uses_tls:
                assert endpoint.cert_path is not None
                self.ssl_context = docker_client_context(endpoint.cert_path, endpoint.tls_verify)
            connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl_context or False, keepalive_timeout=30)
            host = endpoint.http_base.split("://", 1)[1]
        session = aiohttp.ClientSession(
            connector=connector, timeout=_TIMEOUT, auto_decompress=False,
            skip_auto_headers=FORWARD_SKIP_AUTO_HEADERS,
        )
        super().__init__(endpoint.http_base, session, host)
        self.api_range: ApiRange | None = None
        """The API versions this engine accepts; None until read (requests then go at the caller's version)."""
        self._watch: asyncio.Task[None] | None = None

    async def read_api_range(self, announce: bool = False) -> ApiRange | None:
        """`GET /version` (unversioned: every engine answers it) -> MinAPIVersion..ApiVersion."""
        async with self.session.get(self.base_url + "/version", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
        found = ApiRange.from_version_body(body) if isinstance(body, dict) else None
        if found is not None and (announce or found != self.api_range):
            log.info("engine API versions %d.%d..%d.%d", *found.low, *found.high)
            self.api_range = found
        return found

    def start_watch(self) -> None:
        """Keep `api_range` true across engine restarts and upgrades (see _watch_api_range)."""
        if self._watch is None:
            self._watch = supervise(self._watch_api_range, "engine-version-watch")

    async def _watch_api_range(self) -> None:
        """Read the range, then hold a daemon-events stream open: it ends when the engine stops (restart or
        upgrade), and a `reload` event may change the engine too; either way the range is read again."""
        delay = 0.5
        events = {"filters": json.dumps({"type": ["daemon"]})}
        reconnect = False
        while True:
            try:
                if reconnect or self.api_range is None:  # start-up has read it already
                    await self.read_api_range(announce=reconnect)
                reconnect = True
                async with self.session.get(self.base_url + "/events", params=events) as resp:
                    delay = 0.5
                    async for _line in resp.content:
                        await self.read_api_range()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("engine version watch: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.endpoint.is_unix:
            return await asyncio.open_unix_connection(self.endpoint.socket_path, limit=2**16)
        host, _, port = self.host_header.rpartition(":")
        if self.ssl_context is not None:
            return await open_tls_connection(host, int(port), self.ssl_context)
        return await asyncio.open_connection(host, int(port), limit=2**16)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.session.close()


class PeerPool:
    """Keep-alive HTTPS (or HTTP in Edge mode) sessions to the other agents, one pool for all peers."""

    def __init__(self, tls: bool = True, client_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 10.0) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        shrink_client_read_buffers()
        self.ssl_context = (client_context or peer_client_context()) if tls else None
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=64, ssl=self.ssl_context or False, keepalive_timeout=60,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            # a peer that does not connect within this is down (or cut off): fan-outs skip it, manager
            # operations try the next manager
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout, sock_read=None),
            skip_auto_headers=FORWARD_SKIP_AUTO_HEADERS,
        )

    def upstream(self, ip: str, port: int) -> PeerUpstream:
        return PeerUpstream(self, ip, port)

    async def close(self) -> None:
        await self.session.close()


class PeerUpstream(Upstream):
    name = "peer"

    def __init__(self, pool: PeerPool, ip: str, port: int) -> None:
        self.pool = pool
        self.ip = ip
        self.port = port
        host = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        super().__init__(f"{'https' if pool.tls else 'http'}://{host}", pool.session, host)
        self.connect_timeout = pool.connect_timeout

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.pool.ssl_context is not None:
            return await open_tls_connection(self.ip, self.port, self.pool.ssl_context)
        return await asyncio.open_connection(self.ip, self.port, limit=2**16)
