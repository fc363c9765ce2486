"""Where a forwarded request goes: the local engine or another agent, each over pooled connections.

Both kinds look the same to forward.py and fanout.py: `send` (one request over a kept-alive connection; its
answer has `status`, `reason`, `headers` and the body as an aiohttp StreamReader in `content`) and
`open_raw` (a connection of its own, for hijacked attach/exec streams). The engine hop, which every relayed
request takes, goes through the lean client of proxy/h1.py; peers through an aiohttp session (TLS, many
hosts, and a fan-out's connect deadlines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterable, Mapping
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from agent.config import DockerEndpoint
from agent.tasks import supervise
from agent.tls import docker_client_context, peer_client_context
from agent.tlsproto import open_tls_connection, shrink_client_read_buffers
from proxy.h1 import H1Pool, tcp_socket, unix_socket
from proxy.target import ApiRange

log = logging.getLogger(__name__)

FORWARD_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
"""aiohttp's client adds these when the request lacks them; a relayed request carries the caller's only."""
ENGINE_CONNECT_TIMEOUT = 10.0


class Answer(Protocol):
    """An upstream's answer: its head, and its body as it arrives; `async with` releases the connection."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> StreamReader: ...

    async def read(self) -> bytes: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> Any: ...


Body = bytes | AsyncIterable[bytes] | None


class Upstream:
    """One HTTP destination (engine or peer agent) reached over pooled connections."""

    name = "upstream"
    connect_timeout: float | None = None
    """Deadline for a new connection (None: the pool's)."""

    def __init__(self, base_url: str, host_header: str) -> None:
        self.base_url = base_url
        self.host_header = host_header

    async def send(self, method: str, path_qs: str, headers: Mapping[str, str], body: Body = None,
                   chunked: bool = False) -> Answer:
        """One request (the caller's headers as they are, Host excepted); returns once the answer's head is
        in. Raises ConnectFailed (or aiohttp's connector errors) when no connection could be made."""
        raise NotImplementedError

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise NotImplementedError


class EngineUpstream(Upstream):
    """The local Docker engine, on its unix socket or on tcp:// (with the CLI's TLS files)."""

    name = "docker"

    def __init__(self, endpoint: DockerEndpoint) -> None:
        self.endpoint = endpoint
        self.ssl_context: ssl.SSLContext | None = None
        if endpoint.is_unix:
            host = "docker"
            connect = unix_socket(endpoint.socket_path)
        else:
            if endpoint.uses_tls:
                assert endpoint.cert_path is not None
                self.ssl_context = docker_client_context(endpoint.cert_path, endpoint.tls_verify)
            host = endpoint.http_base.split("://", 1)[1]
            name, _, port = host.rpartition(":")
            connect = tcp_socket(name.strip("[]"), int(port), self.ssl_context)
        super().__init__(endpoint.http_base, host)
        self.pool = H1Pool(connect, host, connect_timeout=ENGINE_CONNECT_TIMEOUT, keepalive=30.0)
        self.api_range: ApiRange | None = None
        """The API versions this engine accepts; None until read (requests then go at the caller's version)."""
        self._watch: asyncio.Task[None] | None = None

    async def send(self, method: str, path_qs: str, headers: Mapping[str, str], body: Body = None,
                   chunked: bool = False) -> Answer:
        return await self.pool.request(method, path_qs, headers.items(), body, chunked)

    async def read_api_range(self, announce: bool = False) -> ApiRange | None:
        """`GET /version` (unversioned: every engine answers it) -> MinAPIVersion..ApiVersion."""
        async with asyncio.timeout(10):
            async with await self.send("GET", "/version", {}) as resp:
                raw = await resp.read() if resp.status == 200 else b""
        body = json.loads(raw) if raw else None
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
                async with await self.send("GET", "/events?" + urlencode(events), {}) as resp:
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
        await self.pool.close()


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
        super().__init__(f"{'https' if pool.tls else 'http'}://{host}", host)
        self.session = pool.session
        self.connect_timeout = pool.connect_timeout

    async def send(self, method: str, path_qs: str, headers: Mapping[str, str], body: Body = None,
                   chunked: bool = False) -> Answer:
        return await self.session.request(
            method, self.base_url + path_qs, headers=headers, data=body,
            allow_redirects=False, compress=None, chunked=chunked or None,
        )

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.pool.ssl_context is not None:
            return await open_tls_connection(self.ip, self.port, self.pool.ssl_context)
        return await asyncio.open_connection(self.ip, self.port, limit=2**16)
