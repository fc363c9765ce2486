"""The engine hop's lean HTTP/1.1 client against a scripted server on loopback: keep-alive reuse, bodies of
every framing, a kept-alive connection the server closed, an answer cut short, request bodies streamed up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import ClientPayloadError

from proxy.h1 import BadHeader, ConnectFailed, H1Pool, tcp_socket

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server that runs `script` per connection and counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> H1Pool:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.pool = H1Pool(tcp_socket("127.0.0.1", port, None), f"127.0.0.1:{port}")
        return self.pool

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    line, *rest = head.split("\r\n")
    headers = {k.lower(): v for k, v in (h.split(": ", 1) for h in rest if h)}
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return line, headers, body


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            line, headers, body = await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        answer = f"{line}|{headers.get('host')}|{len(body)}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()


async def test_connections_are_kept_alive_and_reused() -> None:
    server = Server(keep_alive)
    async with server as pool:
        for i in range(3):
            async with await pool.request("GET", f"/v1.41/x?i={i}", [("X-A", "1")]) as resp:
                assert resp.status == 200
                assert await resp.read() == f"GET /v1.41/x?i={i} HTTP/1.1|{pool.host}|0".encode()
        assert server.connections == 1


async def test_an_answer_not_read_to_its_end_costs_its_connection() -> None:
    server = Server(keep_alive)
    async with server as pool:
        async with await pool.request("GET", "/a", []) as resp:
            assert resp.status == 200  # body left unread
        async with await pool.request("GET", "/b", []) as resp:
            assert (await resp.read()).startswith(b"GET /b")
        assert server.connections == 2


async def test_chunked_and_until_close_bodies_stream() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if "chunked" in line:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"one\n", b"two\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async with Server(script) as pool:
        async with await pool.request("GET", "/chunked", []) as resp:
            assert [line async for line in resp.content] == [b"one\n", b"two\n"]
        async with await pool.request("GET", "/plain", []) as resp:
            assert await resp.read() == b"until the end"


def answering(raw: bytes, keep_alive: bool) -> Script:
    """A script that answers every request with `raw`; without `keep_alive`, only the first, then closes."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(raw)
            await writer.drain()
            if not keep_alive:
                return

    return script


async def test_a_kept_alive_connection_the_server_closed_is_retried_once() -> None:
    server = Server(answering(b"HTTP/1.1 204 No Content\r\n\r\n", keep_alive=False))
    async with server as pool:
        for _ in range(2):
            async with await pool.request("POST", "/containers/x/start", []) as resp:
                assert resp.status == 204
                assert await resp.read() == b""
            await asyncio.sleep(0.05)  # let the close arrive, as it would on an idle connection
        assert server.connections == 2


async def test_an_answer_cut_short_is_a_payload_error() -> None:
    async with Server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", False)) as pool:
        async with await pool.request("GET", "/x", []) as resp:
            with pytest.raises(ClientPayloadError):
                await resp.read()


async def test_request_bodies_stream_up_chunked_or_with_their_length() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"a" * 70000, b"", b"b" * 10):
            yield piece

    async with Server(keep_alive) as pool:
        async with await pool.request("POST", "/build", [], pieces(), chunked=True) as resp:
            assert (await resp.read()).endswith(b"|70010")
        async with await pool.request("POST", "/x", [], b"12345") as resp:
            assert (await resp.read()).endswith(b"|5")
        async with await pool.request("POST", "/x", []) as resp:  # an empty POST says Content-Length: 0
            assert (await resp.read()).endswith(b"|0")


async def test_head_answers_have_no_body_and_keep_the_connection() -> None:
    server = Server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", keep_alive=True))
    async with server as pool:
        for _ in range(2):
            async with await pool.request("HEAD", "/_ping", []) as resp:
                assert resp.headers["Content-Length"] == "42"
                assert await resp.read() == b""
        assert server.connections == 1


async def test_line_breaks_in_headers_never_reach_the_wire() -> None:
    async with Server(keep_alive) as pool:
        with pytest.raises(BadHeader):
            await pool.request("GET", "/x", [("X-A", "1\r\nX-Injected: 1")])


async def test_no_server_is_connect_failed() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = H1Pool(tcp_socket("127.0.0.1", port, None), "x")
    with pytest.raises(ConnectFailed):
        await pool.request("GET", "/", [])
