"""A lean keep-alive HTTP/1.1 client for the engine hop, the one every relayed request takes.

aiohttp's ClientSession was a third of the agent's CPU per relayed `/_ping`: cookie jar, tracing, URL
building, auto headers, timers, all per request. The engine hop needs none of that: one request head written
in one piece on a kept-alive connection, the answer parsed by aiohttp's own (C) response parser into aiohttp's
own StreamReader, so everything above reads it exactly like a ClientResponse's `content`.

What it relies on of aiohttp below its public API (checked by tests/unit/test_internals.py):
`aiohttp.http_parser.HttpResponseParser` (feed_data/feed_eof, with its payload StreamReader pausing and
resuming the protocol) and `aiohttp.base_protocol.BaseProtocol` (flow control for both directions).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType

from aiohttp import ClientPayloadError, ServerDisconnectedError
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

READ_LIMIT = 2**16
"""The payload reader pauses the socket above twice this much unread."""
NO_BODY_STATUS = frozenset((204, 304))
SENDS_LENGTH_ZERO = frozenset(("POST", "PUT", "PATCH"))
"""Methods that announce an empty body as `Content-Length: 0`, as Go's and aiohttp's clients do."""

Connect = Callable[[Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]]


class ConnectFailed(ConnectionError):
    """No connection to the upstream could be made: nothing of the request was sent."""


class BadHeader(ValueError):
    """A header name or value would break the request head (CR, LF)."""


class _Connection(BaseProtocol):
    """One connection: at most one request in flight; reusable after a complete, keep-alive answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.reusable = True
        self.idle_since = 0.0
        self.answered = False
        """Some byte of an answer arrived for the current request."""
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None

    def expect(self, method: str) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        self._parser = HttpResponseParser(
            self, self._loop, READ_LIMIT, payload_exception=ClientPayloadError,
            response_with_body=method != "HEAD", read_until_eof=True, auto_decompress=False,
        )
        self._payload = None
        self.answered = False
        self._head = self._loop.create_future()
        return self._head

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:  # bytes nobody asked for on an idle connection: it cannot be trusted again
                self._give_up()
            return
        if data:
            self.answered = True
        try:
            messages, _upgraded, _tail = parser.feed_data(data)
        except Exception as exc:  # a malformed answer: this connection is done
            self._give_up()
            self._fail(ClientPayloadError(f"malformed answer from the upstream: {exc!r}"))
            return
        for message, payload in messages:
            if 100 <= message.code < 200:  # informational (100 Continue): the real answer follows
                continue
            if message.should_close:
                self.reusable = False
            head = self._head
            if head is None or head.done():  # a second answer to one request
                self._give_up()
                return
            body = EMPTY_PAYLOAD if message.code in NO_BODY_STATUS else payload
            self._payload = body
            head.set_result((message, body))

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.reusable = False
        parser, self._parser = self._parser, None
        payload = self._payload
        if parser is not None:
            try:
                parser.feed_eof()  # ends a body that runs until the connection closes
            except Exception as err:
                if payload is not None and not payload.is_eof():
                    payload.set_exception(ClientPayloadError(f"answer cut short: {err!r}"))
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(ClientPayloadError("the upstream closed the connection mid-answer"))
        self._fail(ServerDisconnectedError(None if exc is None else f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof() and self._payload.exception() is None:
            self._payload.set_exception(exc)

    def _give_up(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def finished(self) -> bool:
        """The answer was read to its end and the connection may carry another request."""
        return (self.reusable and self.transport is not None and not self.transport.is_closing()
                and self._payload is not None and self._payload.at_eof() and self._payload.exception() is None)

    async def drain(self) -> None:
        await self._drain_helper()


class Response:
    """The answer's head plus its body as an aiohttp StreamReader; `async with` returns the connection."""

    def __init__(self, pool: H1Pool, conn: _Connection, message: RawResponseMessage, content: StreamReader,
                 sender: asyncio.Task[None] | None) -> None:
        self.status = message.code
        self.reason = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self._pool = pool
        self._conn: _Connection | None = conn
        self._sender = sender

    async def read(self) -> bytes:
        """The whole body (for answers known to be small)."""
        return await self.content.read()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        sender = self._sender
        if sender is not None and not sender.done():  # the body is not all sent: the engine still reads it
            sender.cancel()
            conn.reusable = False
        self._pool.put_back(conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class H1Pool:
    """Kept-alive connections to one HTTP/1.1 server, made by `connect` (a unix or TCP socket)."""

    def __init__(self, connect: Connect, host: str, connect_timeout: float = 10.0, keepalive: float = 30.0,
                 max_idle: int = 128) -> None:
        self._connect = connect
        self.host = host
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    async def _new(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self._connect(lambda: _Connection(loop))
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        assert isinstance(protocol, _Connection)
        return protocol

    def _take_idle(self) -> _Connection | None:
        stale_before = time.monotonic() - self.keepalive
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since >= stale_before and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn._give_up()
        return None

    def put_back(self, conn: _Connection) -> None:
        if conn.finished() and not self._closed and len(self._idle) < self.max_idle:
            conn._parser = None  # back to idle: any byte now is unasked for
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn._give_up()

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: bytes | AsyncIterable[bytes] | None = None, chunked: bool = False) -> Response:
        """Send one request (`target` is the path and query) and wait for the answer's head. A kept-alive
        connection that turns out closed before any answer byte is retried once on a new one, when no body
        of the caller's was consumed."""
        head = _head(method, target, self.host, headers, body, chunked)
        conn = self._take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._new()
            try:
                return await self._exchange(conn, method, head, body, chunked)
            except ServerDisconnectedError:
                if not reused or conn.answered or not (body is None or isinstance(body, bytes)):
                    raise
                conn, reused = None, False  # the engine had closed an idle connection: try once more

    async def _exchange(self, conn: _Connection, method: str, head: bytes,
                        body: bytes | AsyncIterable[bytes] | None, chunked: bool) -> Response:
        answer = conn.expect(method)
        transport = conn.transport
        if transport is None:
            raise ServerDisconnectedError()
        sender: asyncio.Task[None] | None = None
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                transport.write(head + body)
            else:
                transport.write(head)
                sender = asyncio.get_running_loop().create_task(_send_body(conn, body, chunked))
            message, content = await answer
        except BaseException:
            if sender is not None:
                sender.cancel()
            conn._give_up()
            raise
        return Response(self, conn, message, content, sender)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn._give_up()


async def _send_body(conn: _Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
    """Stream the caller's body up as it arrives; a caller who breaks off breaks the upstream request too."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            if conn.transport is None:
                return
            conn.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception:  # the caller's upload broke: the upstream must not take a truncated body as whole
        conn.reusable = False
        if conn.transport is not None:
            conn.transport.abort()


def _head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]],
          body: bytes | AsyncIterable[bytes] | None, chunked: bool) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    has_length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "host":
            continue
        if lowered == "content-length":
            has_length = True
        lines.append(f"{name}: {value}")
    if isinstance(body, bytes):
        if not has_length:
            lines.append(f"Content-Length: {len(body)}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body is None and not has_length and method in SENDS_LENGTH_ZERO:
        lines.append("Content-Length: 0")
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise BadHeader("a header name or value holds a line break")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


def unix_socket(path: str) -> Connect:
    """A `connect` for H1Pool: the unix socket at `path`."""

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        return await asyncio.get_running_loop().create_unix_connection(factory, path)

    return connect


def tcp_socket(host: str, port: int, ssl_context: ssl.SSLContext | None) -> Connect:
    """A `connect` for H1Pool: TCP to host:port, with TLS when `ssl_context` is given."""

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        return await asyncio.get_running_loop().create_connection(
            factory, host, port, ssl=ssl_context, server_hostname=host if ssl_context is not None else None)

    return connect

