"""Streaming forwarding of one request to an upstream (engine or peer): plain HTTP and hijacked streams.

Nothing is buffered: request bodies go up as they arrive, response bodies come down as they arrive, and a
hijacked connection (attach, exec, `docker run -i`) becomes a byte pipe in both directions that keeps
half-closes, with back-pressure on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from agent.connguard import unwrap_protocol
from agent.errors import Code, json_error, log_failure
from agent.metrics import Metrics
from agent.tasks import spawn
from proxy.h1 import ConnectFailed
from proxy.upstream import Upstream

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
        "Transfer-Encoding", "Upgrade", "Host", "Proxy-Connection",
    )
)
CHUNK = 2**16
GATHER_BELOW = 2**14  # a streamed piece smaller than one TLS record waits for more (see pipe_body) ...
GATHER_WAIT = 0.002  # ... for at most this long
HIGH_WATER = 2**18


_NO_TOKENS: frozenset[str] = frozenset()


def _connection_tokens(headers: Mapping[str, str]) -> AbstractSet[str]:
    """The header names a `Connection` header lists (hop-by-hop for this message, RFC 9110 7.6.1)."""
    connection = headers.get("Connection")
    return {t.strip().lower() for t in connection.split(",")} if connection else _NO_TOKENS


def unreachable_text(upstream: Upstream, exc: BaseException) -> str:
    """The message of a 502 for an upstream that could not be reached."""
    return f"Unable to reach {upstream.name} at {upstream.base_url}: {exc}"


class UpstreamUnreachable(Exception):
    """No connection to the upstream could be made: nothing of the request was sent, so another upstream
    may be tried (a manager operation falls through to the next manager)."""


def outgoing_headers(request: web.Request, extra: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    """The caller's headers minus hop-by-hop ones, plus X-Forwarded-For and what the route adds."""
    return forwarded_headers(request.headers, request.remote, extra)


def forwarded_headers(caller: Mapping[str, str], peer: str | None,
                      extra: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    """`caller`'s headers minus hop-by-hop ones, plus X-Forwarded-For (`peer`: the caller's address) and
    what the route adds."""
    headers: CIMultiDict[str] = CIMultiDict()
    connection_tokens = _connection_tokens(caller)
    for name, value in caller.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens:
            continue
        headers.add(name, value)
    if peer:
        prior = caller.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    for name, value in (extra or {}).items():
        headers[name] = value
    return headers


def response_headers(upstream_headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    connection_tokens = _connection_tokens(upstream_headers)
    for name, value in upstream_headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens or lowered == "content-length":
            continue
        out.add(name, value)
    return out


def upgrade_token(request: web.Request) -> str | None:
    """`tcp` for Docker's hijack (attach, exec start), `websocket` for WebSockets; None for plain requests."""
    token = request.headers.get("Upgrade", "").strip().lower()
    if token in ("tcp", "websocket") and "upgrade" in request.headers.get("Connection", "").lower():
        return token
    return None


async def forward_http(
    request: web.Request,
    upstream: Upstream,
    path_qs: str,
    metrics: Metrics,
    extra_headers: Mapping[str, str] | None = None,
    unreachable: Code = Code.PROXY_DOCKER_UNREACHABLE,
    fall_through: bool = False,
    head_timeout: float | None = None,
) -> web.StreamResponse:
    """Relay one request and its streamed response to `path_qs`. With `fall_through`, a failed connection
    (or, with `head_timeout`, no answer head in time) raises UpstreamUnreachable instead of answering 502."""
    headers = outgoing_headers(request, extra_headers)
    headers["Host"] = upstream.host_header
    body: Any = None
    chunked = False
    if request.body_exists:
        body = _counting(request.content, metrics, "upload")
        chunked = "Content-Length" not in headers
    sending = upstream.send(request.method, path_qs, headers, body, chunked)
    try:
        if head_timeout is None:
            upstream_resp = await sending
        else:
            async with asyncio.timeout(head_timeout):
                upstream_resp = await sending
    except TimeoutError as exc:  # only with head_timeout: a kept-alive connection to a node now cut off
        if fall_through:
            raise UpstreamUnreachable(f"no answer within {head_timeout:g}s") from exc
        return json_error(504, f"{upstream.name} at {upstream.base_url} did not answer in time", unreachable)
    except (ConnectFailed, aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        if fall_through:
            raise UpstreamUnreachable(str(exc) or type(exc).__name__) from exc
        return json_error(502, unreachable_text(upstream, exc), unreachable)
    except (aiohttp.ClientError, OSError) as exc:
        return json_error(502, unreachable_text(upstream, exc), unreachable)
    async with upstream_resp:
        content = upstream_resp.content
        first = content.read_nowait() if request.method != "HEAD" else b""
        # What came with the head goes out with ours, in one write (one TLS record, one send); a head whose body
        # is not there yet (events, logs -f) goes out at once, as before.
        kind = _CoalescedResponse if first or content.at_eof() else web.StreamResponse
        response = kind(status=upstream_resp.status, reason=upstream_resp.reason,
                        headers=response_headers(upstream_resp.headers))
        length = upstream_resp.headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                await pipe_body(content, response, metrics, length is None, first)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log_failure(Code.PROXY_CLIENT_GONE, "client went away during a stream", path=request.path)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log_failure(Code.PROXY_DOCKER_STREAM_BROKEN, f"upstream stream broke: {exc}", path=request.path)
            if request.transport is not None:  # the caller may be gone already
                request.transport.close()
    return response


class _CoalescedResponse(web.StreamResponse):
    """A relayed answer whose head waits for the first piece of body (aiohttp's web.Response does so)."""

    _send_headers_immediately = False


class Sink(Protocol):
    """Where a relayed body goes: aiohttp's StreamResponse, or the lean front's connection."""

    async def write(self, data: bytes) -> None: ...


async def pipe_body(content: aiohttp.StreamReader, response: Sink, metrics: Metrics,
                    gather: bool, first: bytes = b"") -> None:
    """Copy a response body as it arrives. With `gather` (a body of unknown length: logs, events, save), a
    piece smaller than GATHER_BELOW waits at most GATHER_WAIT for more (up to CHUNK), so that a burst of small
    pieces (`docker logs` sends one HTTP chunk per line) goes out as one write (one TLS record, one send)
    instead of one per line."""
    counter = metrics.streamed("download")
    while True:
        if first:
            chunk, first = first, b""
        elif content.at_eof():  # the whole body came with the head (a small answer): no further read
            return
        else:
            chunk = await content.readany()
            if not chunk:
                return
        if gather and len(chunk) < GATHER_BELOW:
            parts = [chunk]
            size = len(chunk)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GATHER_WAIT):
                    while size < CHUNK:
                        more = await content.readany()
                        if not more:
                            break
                        parts.append(more)
                        size += len(more)
            chunk = b"".join(parts)
        counter.inc(len(chunk))
        await response.write(chunk)


async def _counting(stream: aiohttp.StreamReader, metrics: Metrics, direction: str) -> Any:
    counter = metrics.streamed(direction)
    async for chunk in stream.iter_any():
        counter.inc(len(chunk))
        yield chunk


# --- Hijacked streams --------------------------------------------------------------------------------


class UpstreamHandshake:
    """The upstream's answer to a hijack request: either upgraded (reader/writer live) or a plain response."""

    def __init__(self, status: int, reason: str, headers: CIMultiDict[str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, body: bytes = b"") -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.reader = reader
        self.writer = writer
        self.body = body

    @property
    def upgraded(self) -> bool:
        return self.status in (101, 200) and not self.body and (
            self.status == 101 or "raw-stream" in self.headers.get("Content-Type", "")
            or "multiplexed-stream" in self.headers.get("Content-Type", "")
        )

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # closing an already broken or closed transport
            self.writer.close()


HIJACK_CONNECT_TIMEOUT = 10.0
HIJACK_HEAD_TIMEOUT = 30.0
MAX_ERROR_BODY = 2**20


class HijackError(Exception):
    """The upstream of a hijack could not be reached in time, or answered something that is not HTTP."""


class HijackConnectError(HijackError):
    """No connection to the upstream of a hijack: nothing was sent."""


def parse_response_head(head: bytes) -> tuple[int, str, CIMultiDict[str]]:
    """Status, reason and headers of an HTTP/1.x response head (ending in a blank line). Pure."""
    text = head.decode("latin-1")
    status_line, *header_lines = text.rstrip("\r\n").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise HijackError(f"not an HTTP response: {status_line[:80]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise HijackError(f"malformed response header line: {line[:80]!r}")
        headers.add(name.strip(), value.strip())
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


async def open_hijack(
    upstream: Upstream, method: str, path_qs: str, headers: Mapping[str, str],
    body: bytes | AsyncIterable[bytes], upgrade: str = "tcp", length: int | None = None,
) -> UpstreamHandshake:
    """Send a hijack request on a fresh raw connection and read the response head.

    `body` is bytes or a stream; a stream is sent with `length` as Content-Length, or chunked when None.
    Every step has a deadline, and the connection is closed on any failure."""
    try:
        async with asyncio.timeout(upstream.connect_timeout or HIJACK_CONNECT_TIMEOUT):
            reader, writer = await upstream.open_raw()
    except TimeoutError:
        raise HijackConnectError(f"no connection within {HIJACK_CONNECT_TIMEOUT:g}s") from None
    except OSError as exc:
        raise HijackConnectError(str(exc)) from exc
    try:
        lines = [f"{method} {path_qs} HTTP/1.1", f"Host: {upstream.host_header}"]
        for name, value in headers.items():
            if name.lower() in ("content-length", "host", "connection", "upgrade", "transfer-encoding"):
                continue
            lines.append(f"{name}: {value}")
        lines += ["Connection: Upgrade", f"Upgrade: {upgrade}"]
        chunked = False
        if isinstance(body, bytes):
            if body or method not in ("GET", "HEAD"):
                lines.append(f"Content-Length: {len(body)}")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        else:
            chunked = True
            lines.append("Transfer-Encoding: chunked")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if isinstance(body, bytes):
            writer.write(body)
        else:
            async for chunk in body:  # streamed with back-pressure, never held whole
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(HIJACK_HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            status, reason, resp_headers = parse_response_head(head)
            data = b""
            declared = resp_headers.get("Content-Length", "")
            if status != 101 and declared.isdigit():
                if int(declared) > MAX_ERROR_BODY:
                    raise HijackError(f"an answer of {declared} bytes to a hijack request")
                data = await reader.readexactly(int(declared))
            elif status >= 300 and resp_headers.get("Transfer-Encoding", "").lower() != "chunked":
                data = await reader.read(MAX_ERROR_BODY)
    except TimeoutError:
        writer.close()
        raise HijackError(f"no answer within {HIJACK_HEAD_TIMEOUT:g}s") from None
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
        writer.close()
        raise HijackError(f"the answer's head is too long or cut short: {exc}") from None
    except BaseException:
        writer.close()
        raise
    return UpstreamHandshake(status, reason, resp_headers, reader, writer, data)


class _ClientSide(asyncio.Protocol):
    """Takes over the caller's transport after the 101: bytes go straight to the upstream writer."""

    def __init__(self, transport: asyncio.Transport, upstream: asyncio.StreamWriter, original: Any,
                 metrics: Metrics) -> None:
        self.transport = transport
        self.upstream = upstream
        self.original = original
        self.counter = metrics.streamed("upload")
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.lost = asyncio.Event()
        self.eof = asyncio.Event()
        self._draining = False

    def data_received(self, data: bytes) -> None:
        self.counter.inc(len(data))
        self.upstream.write(data)
        if self.upstream.transport.get_write_buffer_size() > HIGH_WATER and not self._draining:
            self._draining = True
            self.transport.pause_reading()
            spawn(self._drain(), "hijack-drain")

    async def _drain(self) -> None:
        try:
            await self.upstream.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._draining = False
            if not self.lost.is_set():
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof.set()
        if self.upstream.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.upstream.write_eof()
        return True  # keep our side open: the upstream may still have output for the caller

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.can_write.set()
        with contextlib.suppress(Exception):
            self.original.connection_lost(exc)


async def relay_hijack(
    request: web.Request,
    upstream: Upstream,
    path_qs: str,
    metrics: Metrics,
    extra_headers: Mapping[str, str] | None = None,
    unreachable: Code = Code.PROXY_DOCKER_UNREACHABLE,
    fall_through: bool = False,
) -> web.StreamResponse:
    """A hijack or WebSocket upgrade through the agent: upstream 101, our 101, then raw bytes both ways."""
    body: bytes | AsyncIterable[bytes] = _counting(request.content, metrics, "upload") \
        if request.body_exists else b""
    headers = outgoing_headers(request, extra_headers)
    upgrade = upgrade_token(request) or "tcp"
    try:
        hs = await open_hijack(upstream, request.method, path_qs, headers, body, upgrade,
                               length=request.content_length)
    except HijackConnectError as exc:
        if fall_through:
            raise UpstreamUnreachable(str(exc)) from exc
        return json_error(502, unreachable_text(upstream, exc), unreachable)
    except (OSError, HijackError) as exc:
        return json_error(502, unreachable_text(upstream, exc), unreachable)
    if not hs.upgraded:
        hs.close()
        resp = web.Response(status=hs.status, reason=hs.reason, body=hs.body,
                            headers=response_headers(hs.headers))
        return resp
    response = web.StreamResponse(status=hs.status, reason=hs.reason, headers=response_headers(hs.headers))
    if hs.status == 101:
        response.headers["Connection"] = "Upgrade"
        response.headers["Upgrade"] = hs.headers.get("Upgrade", upgrade)
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    original = transport.get_protocol()
    app_protocol = unwrap_protocol(original)
    client = _ClientSide(transport, hs.writer, original, metrics)
    # Bytes the caller sent after its head (already read by aiohttp) belong to the stream: aiohttp keeps them
    # in its private _message_tail (checked against the aiohttp version by tests/unit/test_internals.py).
    tail: bytes = getattr(app_protocol, "_message_tail", b"")
    transport.set_protocol(client)  # from here the caller's bytes bypass aiohttp's HTTP parser and go upstream
    if tail:
        app_protocol._message_tail = b""
        client.data_received(tail)
    transport.resume_reading()  # aiohttp paused reading while its handler ran; the raw stream needs it on
    metrics.hijacked.inc()
    counter = metrics.streamed("download")
    try:
        while not client.lost.is_set():
            data = await hs.reader.read(CHUNK)
            if not data:
                break
            counter.inc(len(data))
            if client.lost.is_set():
                break
            transport.write(data)
            if not client.can_write.is_set():  # back-pressure: a slow caller pauses our reads of the engine
                await client.can_write.wait()
    except (ConnectionError, OSError) as exc:
        log_failure(Code.PROXY_DOCKER_STREAM_BROKEN, f"hijacked stream broke: {exc}", path=request.path)
    finally:
        metrics.hijacked.dec()
        hs.close()
        if not transport.is_closing():
            transport.close()
    return response


async def relay(
    request: web.Request,
    upstream: Upstream,
    path_qs: str,
    metrics: Metrics,
    extra_headers: Mapping[str, str] | None = None,
    unreachable: Code = Code.PROXY_DOCKER_UNREACHABLE,
    upgrades: tuple[str, ...] = ("tcp", "websocket"),
    fall_through: bool = False,
    head_timeout: float | None = None,
) -> web.StreamResponse:
    """Forward the caller's request to `path_qs` (the normalised target that routing saw): hijacked when it
    asks to upgrade, streamed otherwise."""
    if upgrade_token(request) in upgrades:
        return await relay_hijack(request, upstream, path_qs, metrics, extra_headers, unreachable, fall_through)
    return await forward_http(request, upstream, path_qs, metrics, extra_headers, unreachable, fall_through,
                              head_timeout)
