"""The floor of the per-request benchmarks: the least a Python asyncio server in front of the Docker socket does.

    python -m bench.relay --cert PEM --key PEM --socket DOCKER_SOCK --port PORT [--processes N]

TLS on 127.0.0.1:PORT (asyncio's own SSL transport), and each client connection piped byte for byte to a
connection of its own on the Docker socket, both ways, with flow control: no HTTP parsing, no checks, no
header rewriting, no task per request, no metrics. What the agent spends per request above this relay is its
own work (parsing, signature, routing, headers, metrics); what this relay spends above HAProxy is the price of
asyncio and Python. N processes share the port with SO_REUSEPORT, as the agent's workers do; the first is
the parent of the others, so its process tree holds them all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys

from agent.workers import available_cpus, end_with_parent


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
            _, engine = await asyncio.get_running_loop().create_unix_connection(_Side, self.socket_path)
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


async def _serve(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(args.socket), "127.0.0.1", args.port, ssl=ctx,
                                      reuse_port=True, backlog=1024)
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
