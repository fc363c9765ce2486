"""The lean front: a signed GET for this node's engine, relayed without aiohttp's web server.

Most of what Portainer and the Docker CLI send is a signed GET that this node's engine answers (`/_ping`,
`/version`, `/containers/json` outside a Swarm, inspect, logs, `docker save`). For those, aiohttp's server
(request object, middleware chain, response object, access machinery) was over a third of the agent's CPU per
request. This protocol sits where aiohttp's would (above TLS) and serves such a request itself: the head is
parsed by aiohttp's own (C) request parser, checked exactly as the application checks it (target, route,
signature), and relayed on the engine's kept-alive connections with the same header rules.

Anything else (a body, an upgrade, HTTP/1.0, HEAD, another node, an agent endpoint, a failed signature, a head
the parser refuses or one over 16 KiB) is handed to aiohttp: the connection, with every byte not yet answered,
goes to a new aiohttp RequestHandler, and stays there. Nothing of a request is acted on before that choice is
made, so the application sees the connection as if it had had it from the start.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import aiohttp
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDictProxy

from agent.auth import HEADER_PUBLIC_KEY, HEADER_SIGNATURE, Verdict
from agent.connguard import GuardedProtocol
from agent.errors import Code, log_failure
from agent.server import AGENT_HEADER_LINES, MAX_LINE, engine_path
from agent.state import AgentState
from proxy.forward import forwarded_headers, pipe_body, response_headers, unreachable_text
from proxy.h1 import ConnectFailed
from proxy.routing import Api, Kind, classify, decide
from proxy.target import BadTarget, Target, parse_target

KEEPALIVE = 3630.0
"""An idle kept-alive connection is closed after this long (aiohttp's server default)."""
HEAD_LIMIT = 2**14
"""A head not complete within this many bytes goes to the application (a signed GET's head is well under 2 KiB):
unfinished heads are held once, by aiohttp's parser, under the connection guard's budget."""
PIPELINE_LIMIT = 2**16
"""Bytes of requests sent ahead while one is being answered; reading pauses above it."""
NO_BODY_STATUS = frozenset((204, 304))
_HTTP11 = aiohttp.HttpVersion11
_LABEL = "local"


class LeanFront:
    """The connections of one listener: the state they serve, and aiohttp's server to hand a connection to."""

    def __init__(self, state: AgentState, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.state = state
        self.fallback = fallback
        self.connections: set[FrontProtocol] = set()

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    async def shutdown(self, grace: float) -> None:
        """Idle connections close now; a request being answered gets `grace` seconds, then is cancelled."""
        busy = []
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
            else:
                busy.append(conn.task)
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in list(self.connections):
            conn.close()


class FrontProtocol(asyncio.Protocol):
    """One client connection while it carries only requests the lean front serves (see module doc)."""

    def __init__(self, front: LeanFront) -> None:
        self.front = front
        self.transport: Any = None
        self.task: asyncio.Task[None] | None = None
        self.remote: str | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._parser: Any = None
        self._guard: GuardedProtocol | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._last = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._handed_off = False
        self.chunked = False
        """The answer being written goes in HTTP chunks (its length was not known)."""
        self._answering = False
        """The answer's head went out: an error can no longer be answered, only the connection closed."""

    # -- asyncio protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple | list) and peer else None
        self._guard = self.front.state.guard.guard_of(transport)
        # auto_decompress off and no body ever fed: the parser only ever sees heads (see _next)
        self._parser = HttpRequestParser(cast(Any, self), self._loop, 2**16, max_line_size=MAX_LINE,
                                         max_field_size=MAX_LINE, auto_decompress=False)
        self.front.connections.add(self)
        self._last = self._loop.time()
        self._idle_timer = self._loop.call_at(self._last + KEEPALIVE, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.task is None:
            self._next()
        elif len(self._buffer) > PIPELINE_LIMIT and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # the caller is done: the connection closes (aiohttp's server does the same)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None
        self._parser = None  # it refers back to us: without this the connection's memory waits for the cyclic GC
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client went away"))
        if self.task is not None:
            self.task.cancel()  # as aiohttp's handler_cancellation: a stream to a gone caller ends upstream too

    # -- requests ------------------------------------------------------------------------------------

    def _next(self) -> None:
        """Take the next complete request head from the buffer: serve it here or hand the connection off."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_LIMIT:
                self._hand_off()
            return
        size = end + 4
        try:
            messages, upgraded, _tail = self._parser.feed_data(bytes(buffer[:size]))
        except Exception:  # a head the parser refuses: the application answers it in its own words
            self._hand_off()
            return
        if len(messages) != 1 or upgraded:
            self._hand_off()
            return
        message, payload = messages[0]
        target = self._servable(message, payload)
        if target is None:
            self._hand_off()
            return
        del buffer[:size]
        self.task = self._loop.create_task(self._serve(message, target))

    def _servable(self, message: RawRequestMessage, payload: Any) -> Target | None:
        """The request's target when the lean front serves it: a signed HTTP/1.1 GET without body or upgrade,
        routed to this node's engine. Checks only; nothing is counted or changed when the answer is None."""
        if message.method != "GET" or message.version != _HTTP11 or payload is not EMPTY_PAYLOAD:
            return None
        headers: CIMultiDictProxy[str] = message.headers
        if "Upgrade" in headers or "Expect" in headers:
            return None
        try:
            target = parse_target(message.path)
        except BadTarget:
            return None
        if classify("GET", target.route_path).api is not Api.DOCKER:
            return None
        state = self.front.state
        if state.verifier.check(headers.get(HEADER_PUBLIC_KEY), headers.get(HEADER_SIGNATURE)) is not Verdict.OK:
            return None  # the application refuses it, and counts and logs the refusal
        if state.clustered and decide("GET", target.route_path, headers, state.self_member, state.members(),
                                      True, state.engine_managers).kind is not Kind.LOCAL:
            return None
        return target

    def _hand_off(self) -> None:
        """From here the connection is aiohttp's: its handler gets every byte not yet answered."""
        self._handed_off = True
        self.front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        transport = self.transport
        handler = self.front.fallback()
        self._parser = None
        data = bytes(self._buffer)
        self._buffer.clear()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        if self._write_paused:
            handler.pause_writing()
        if data:
            handler.data_received(data)

    async def _serve(self, message: RawRequestMessage, target: Target) -> None:
        state = self.front.state
        metrics = state.metrics
        guard = self._guard
        if guard is not None:
            guard.request_started()
            guard.proven()
        t0 = time.perf_counter()
        self._answering = False
        metrics.in_flight.inc()
        status = 500
        keep_alive = not message.should_close
        try:
            status, keep_alive = await self._relay(message, target, t0, keep_alive)
        except asyncio.CancelledError:
            keep_alive = False
            raise
        except Exception as exc:  # a fault of ours: the caller must not wait for an answer that never comes
            keep_alive = False
            log_failure(Code.INTERNAL, f"relaying a request failed: {exc!r}", path=target.path)
            if self.transport is not None and not self._answering:
                self._write_error(500, f"The agent failed to relay the request: {exc}", False)
        finally:
            metrics.in_flight.dec()
            metrics.request_done(_LABEL, "GET", status)
            if guard is not None:
                guard.request_finished()
            self.task = None
            self._last = self._loop.time()
            if self.transport is not None:
                if not keep_alive:
                    self.transport.close()
                else:
                    self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        """After an answer: the next request sent ahead, or more reading."""
        if self.transport is None or self.task is not None or self._handed_off:
            return
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self._buffer:
            self._next()

    async def _relay(self, message: RawRequestMessage, target: Target, t0: float,
                     keep_alive: bool) -> tuple[int, bool]:
        """The engine's answer to the caller: its status, and whether the connection may carry another."""
        state = self.front.state
        engine = state.engine
        path = engine_path(target, state)
        headers = forwarded_headers(message.headers, self.remote)
        try:
            answer = await engine.send("GET", path, headers)
        except (ConnectFailed, aiohttp.ClientError, OSError) as exc:
            text = unreachable_text(engine, exc)
            log_failure(Code.PROXY_DOCKER_UNREACHABLE, text, status=502)
            self._write_error(502, text, keep_alive)
            state.metrics.observe_latency(_LABEL, time.perf_counter() - t0)
            return 502, keep_alive
        async with answer:
            content = answer.content
            length = answer.headers.get("Content-Length")
            status = answer.status
            lines = [f"HTTP/1.1 {status} {answer.reason or ''}\r\n"]
            for name, value in response_headers(answer.headers).items():
                lines.append(f"{name}: {value}\r\n")
            lines.append(AGENT_HEADER_LINES)
            chunked = False
            if status in NO_BODY_STATUS or status < 200:
                pass
            elif length is not None and length.isdigit():
                lines.append(f"Content-Length: {length}\r\n")
            else:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            if not keep_alive:
                lines.append("Connection: close\r\n")
            lines.append("\r\n")
            head = "".join(lines).encode("utf-8", "surrogateescape")  # as the C parser decoded it
            first = content.read_nowait()
            self.chunked = chunked
            # What came with the engine's head goes out with ours: one write, one TLS record for a small answer.
            self.transport.write(head + self._frame(first) if first else head)
            self._answering = True
            state.metrics.observe_latency(_LABEL, time.perf_counter() - t0)
            if first:
                state.metrics.streamed("download").inc(len(first))
            try:
                await pipe_body(content, self, state.metrics, length is None)
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                log_failure(Code.PROXY_CLIENT_GONE, "client went away during a stream", path=target.path)
                return status, False
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                log_failure(Code.PROXY_DOCKER_STREAM_BROKEN, f"upstream stream broke: {exc}", path=target.path)
                return status, False  # the caller must not take a cut answer for a whole one
        return status, keep_alive

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    async def write(self, data: bytes) -> None:
        """One piece of the answer's body (pipe_body's sink), with back-pressure from a slow caller."""
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        self.transport.write(self._frame(data))
        if self._write_paused:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain

    def _write_error(self, status: int, text: str, keep_alive: bool) -> None:
        """A Docker-style error answer (`{"message": ...}`), as the application's json_error writes it."""
        body = json.dumps({"message": text}).encode()
        close = "" if keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: application/json; charset=utf-8\r\n{AGENT_HEADER_LINES}"
                f"Content-Length: {len(body)}\r\n{close}\r\n")
        self.transport.write(head.encode() + body)

    # -- idle connections ----------------------------------------------------------------------------

    def _idle_check(self) -> None:
        due = self._last + KEEPALIVE
        if self.task is None and self._loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self._loop.call_at(max(due, self._loop.time() + 1.0), self._idle_check)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
