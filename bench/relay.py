"""The floors of the per-request benchmarks: the least a Python asyncio server in front of the Docker socket does.

    python -m bench.relay --cert PEM --key PEM --socket DOCKER_SOCK --port PORT [--processes N] [--checks]

TLS on 127.0.0.1:PORT (asyncio's own SSL transport), and each client connection piped byte for byte to a
connection of its own on the Docker socket, both ways, with flow control: no HTTP parsing, no checks, no
header rewriting, no task per request, no metrics. What the agent spends per request above this relay is its
own work (parsing, signature, routing, headers, metrics); what this relay spends above HAProxy is the price of
asyncio and Python. N processes share the port with SO_REUSEPORT, as the agent's workers do; the first is
the parent of the others, so its process tree holds them all.

With --checks, the relay also does what no agent can leave out of a request, with the agent's own code and
nothing around it: each request head parsed by aiohttp's C parser, its signature checked (agent.auth, the
first key that verifies is pinned, then a cache look-up), its target normalised and classified
(proxy.target, proxy.routing), its headers filtered and X-Forwarded-For added (proxy.forward), a new head
written to the engine; the engine's answer head gets the agent's headers. Still no task per request, no
connection pool, no response parsing (the engine's framing goes through as it is), no metrics. It serves
callers that send one request at a time per connection, as the benchmarks' clients do: the answer head it
rewrites is the first thing the engine sends after a request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
from http import HTTPStatus
from typing import Any, cast

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from agent.auth import HEADER_PUBLIC_KEY, HEADER_SIGNATURE, SignatureVerifier, Verdict
from agent.server import AGENT_HEADER_LINES, MAX_LINE
from agent.workers import available_cpus, end_with_parent
from proxy.forward import forwarded_headers
from proxy.routing import classify
from proxy.target import BadTarget, parse_target

_AGENT_HEADERS = AGENT_HEADER_LINES.encode()


class _Side(asyncio.Protocol):
    """One end of the pipe: what it reads is written to `other`; a full `other` pauses its reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.pending = bytearray()
        """What came before the other end was connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.pending += data
        else:
            other.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Client(_Side):
    engine_side: type[_Side] = _Side

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # held here: the event loop keeps only a weak reference to a task
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, engine = await asyncio.get_running_loop().create_unix_connection(self.engine_side, self.socket_path)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert isinstance(engine, _Side)
        engine.other, self.other = self, engine
        if self.transport is None:
            assert engine.transport is not None
            engine.transport.close()
            return
        if self.pending:
            assert engine.transport is not None
            engine.transport.write(bytes(self.pending))
            self.pending.clear()


class _CheckedEngine(_Side):
    """The engine end with --checks: the agent's headers go into each answer head."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0
        """Answer heads rewritten so far (the client end counts the requests sent)."""
        self._head = bytearray()

    def data_received(self, data: bytes) -> None:
        if isinstance(self.other, _CheckedClient) and self.other.sent > self.answered:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.answered += 1
            data = bytes(self._head[:end + 2]) + _AGENT_HEADERS + bytes(self._head[end + 2:])
            self._head.clear()
        super().data_received(data)


class _CheckedClient(_Client):
    """The client end with --checks (see the module doc)."""

    engine_side = _CheckedEngine

    def __init__(self, socket_path: str, verifier: SignatureVerifier) -> None:
        super().__init__(socket_path)
        self.verifier = verifier
        self._buffer = bytearray()
        self._parser: Any = None
        self._peer: str | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else None
        self._parser = HttpRequestParser(cast(Any, self), asyncio.get_running_loop(), 2**16,
                                         max_line_size=MAX_LINE, max_field_size=MAX_LINE, auto_decompress=False)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self.transport is not None and (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self._buffer[:end + 4])
            del self._buffer[:end + 4]
            self._request(head)

    def _request(self, raw: bytes) -> None:
        try:
            messages, _upgraded, _tail = self._parser.feed_data(raw)
            message, _payload = messages[0]
            target = parse_target(message.path)
        except (HttpProcessingError, BadTarget, IndexError) as exc:
            self._refuse(400, f"bad request: {exc}")
            return
        headers = message.headers
        verdict = self.verifier.check(headers.get(HEADER_PUBLIC_KEY), headers.get(HEADER_SIGNATURE))
        if verdict is not Verdict.OK:
            self._refuse(403, f"Unauthorized: {verdict.value}")
            return
        classify(message.method, target.route_path)  # one engine: every route ends on it
        lines = [f"{message.method} {target.forward_path(target.version)} HTTP/1.1", "Host: docker"]
        lines += [f"{name}: {value}" for name, value in forwarded_headers(headers, self._peer).items()]
        self.sent += 1
        super().data_received(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))

    def _refuse(self, status: int, text: str) -> None:
        body = json.dumps({"message": text}).encode()
        assert self.transport is not None
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        self.transport.write(head.encode() + _AGENT_HEADERS + b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
                             % (len(body), body))
        self.transport.close()


async def _serve(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()
    verifier = SignatureVerifier()

    def client() -> _Client:
        return _CheckedClient(args.socket, verifier) if args.checks else _Client(args.socket)

    server = await loop.create_server(client, "127.0.0.1", args.port, ssl=ctx, reuse_port=True, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=available_cpus())
    parser.add_argument("--checks", action="store_true", help="also the agent's per-request checks (module doc)")
    args = parser.parse_args(argv)
    children = []
    parent = os.getpid()
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            end_with_parent(parent)
            asyncio.run(_serve(args))
            os._exit(0)
        children.append(pid)
    try:
        asyncio.run(_serve(args))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
