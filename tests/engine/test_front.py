"""The lean front (agent/front.py) on a real agent and engine: requests it serves, requests it hands to the
application, and both on one kept-alive connection, in the order they were sent."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from tools.agentproc import AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd


@contextmanager
def tls_conn(agent: AgentProcess) -> Iterator[tuple[socket.socket, BinaryIO]]:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=20) as sock:
        with insecure_context().wrap_socket(sock) as tls:
            yield tls, tls.makefile("rb")


def read_response(stream: BinaryIO, to_head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer off a stream: status, headers (lower-case names), body (Content-Length or chunked;
    none for an answer to HEAD)."""
    status_line = stream.readline().decode("latin-1")
    assert status_line.startswith("HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    body = b""
    if to_head:
        pass
    elif headers.get("transfer-encoding") == "chunked":
        while (size := int(stream.readline().strip(), 16)) > 0:
            body += stream.read(size)
            stream.readline()
        stream.readline()
    elif "content-length" in headers:
        body = stream.read(int(headers["content-length"]))
    return status, headers, body


def head(agent: AgentProcess, line: str, signed: bool = True, extra: str = "") -> bytes:
    signature = "".join(f"{k}: {v}\r\n" for k, v in agent.signer.headers().items()) if signed else ""
    return f"{line}\r\nHost: agent\r\n{signature}{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_order_across_a_hand_off(agent: AgentProcess) -> None:
    """Signed GETs (the front's), an unsigned one (refused by the application), then signed GETs again (the
    connection is the application's from the hand-off on): one write, every answer in order."""
    batch = (head(agent, "GET /_ping HTTP/1.1") + head(agent, "GET /v1.41/version HTTP/1.1")
             + head(agent, "GET /v1.41/version HTTP/1.1", signed=False)
             + head(agent, "GET /_ping HTTP/1.1") + head(agent, "GET /v1.41/info HTTP/1.1"))
    with tls_conn(agent) as (tls, stream):
        tls.sendall(batch)
        answers = [read_response(stream) for _ in range(5)]
    assert [a[0] for a in answers] == [200, 200, 403, 200, 200]
    assert answers[0][2] == b"OK" and answers[3][2] == b"OK"
    assert "ApiVersion" in json.loads(answers[1][2])
    assert "Containers" in json.loads(answers[4][2])
    for status, headers, _ in answers:
        assert headers["portainer-agent-platform"] == "1", (status, headers)
    assert json.loads(answers[2][2])["message"]


def test_a_body_goes_to_the_application_after_served_requests(agent: AgentProcess) -> None:
    """A POST with a body after GETs on the same connection: its body reaches the engine whole."""
    body = json.dumps({"Name": "kls-front-vol", "Labels": {"kls": "front"}}).encode()
    post = head(agent, "POST /v1.41/volumes/create HTTP/1.1",
                extra=f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n") + body
    with tls_conn(agent) as (tls, stream):
        tls.sendall(head(agent, "GET /_ping HTTP/1.1") + post
                    + head(agent, "GET /v1.41/volumes/kls-front-vol HTTP/1.1"))
        answers = [read_response(stream) for _ in range(3)]
        tls.sendall(head(agent, "DELETE /v1.41/volumes/kls-front-vol HTTP/1.1"))
        removed = read_response(stream)
    assert [a[0] for a in answers] == [200, 201, 200]
    assert json.loads(answers[2][2])["Labels"] == {"kls": "front"}
    assert removed[0] == 204


def test_connection_close_is_honoured(agent: AgentProcess) -> None:
    with tls_conn(agent) as (tls, stream):
        tls.sendall(head(agent, "GET /v1.41/version HTTP/1.1", extra="Connection: close\r\n"))
        status, headers, body = read_response(stream)
        assert status == 200 and headers.get("connection") == "close"
        assert json.loads(body)["ApiVersion"]
        assert stream.read() == b""  # the agent closed the connection


def test_an_engine_error_and_a_chunked_answer_pass_through(agent: AgentProcess) -> None:
    """The engine's own 404 (its JSON message as it is) and an answer of unknown length (sent on in chunks)."""
    with tls_conn(agent) as (tls, stream):
        tls.sendall(head(agent, "GET /v1.41/containers/kls-no-such-container/json HTTP/1.1"))
        status, _, body = read_response(stream)
        assert status == 404 and "kls-no-such-container" in json.loads(body)["message"]
        tls.sendall(head(agent, "GET /v1.41/events?since=0&until=1 HTTP/1.1"))
        status, headers, body = read_response(stream)
        assert status == 200 and headers.get("transfer-encoding") == "chunked"
        assert body == b"" or all(json.loads(line) for line in body.splitlines())


def test_http10_and_head_are_served_by_the_application(agent: AgentProcess) -> None:
    with tls_conn(agent) as (tls, stream):
        tls.sendall(head(agent, "HEAD /_ping HTTP/1.1"))
        status, headers, body = read_response(stream, to_head=True)
        assert status == 200 and body == b"" and headers["portainer-agent-platform"] == "1"
    with tls_conn(agent) as (tls, stream):
        tls.sendall(head(agent, "GET /_ping HTTP/1.0"))
        assert stream.readline().startswith(b"HTTP/1.")
        assert b"OK" in stream.read()  # HTTP/1.0 without keep-alive: the answer, then the end


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """A connection's protocol (and with it the TLS buffers it holds on to) is freed as soon as the connection
    ends: the request parser it owns refers back to it, a cycle that connection_lost breaks. Left to the
    cyclic collector, a load of short connections held tens of MiB."""
    import asyncio
    import gc
    import weakref
    from types import SimpleNamespace
    from typing import Any, cast

    from agent.connguard import ConnectionGuard
    from agent.front import FrontProtocol, LeanFront

    made: list[weakref.ref[FrontProtocol]] = []
    front = LeanFront(cast(Any, SimpleNamespace(guard=ConnectionGuard())), asyncio.Protocol)

    def factory() -> FrontProtocol:
        protocol = front()
        made.append(weakref.ref(protocol))
        return protocol

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    gc.disable()
    try:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /_pi")  # half a head: the protocol holds a buffer and its parser
        await writer.drain()
        for _ in range(1000):  # until the server has taken the connection (bounded: 10 s)
            if front.connections:
                break
            await asyncio.sleep(0.01)
        assert front.connections
        writer.close()
        for _ in range(1000):  # until connection_lost has run (bounded: 10 s)
            if not front.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the transport lets go of its protocol after connection_lost
        assert len(made) == 1 and not front.connections
        assert made[0]() is None, gc.get_referrers(made[0]())
    finally:
        gc.enable()
        server.close()


def test_a_slow_reader_holds_the_stream_back_not_the_agent(agent: AgentProcess, engine: PrivateDockerd) -> None:
    """A signed GET of a large answer (a container's export, 256 MiB) read slowly: the front waits for the
    caller (TLS write flow control) instead of buffering what the engine sends, and a caller that leaves
    mid-stream frees the engine's connection."""
    import time

    from tests.engine.test_hostile import Sampler

    name = f"kls-front-export-{int(time.time())}"
    engine.cli("run", "--name", name, "busybox:local", "dd", "if=/dev/zero", "of=/big", "bs=1M", "count=256")
    try:
        assert agent.proc is not None
        with Sampler(agent.proc.pid) as sampler, tls_conn(agent) as (tls, stream):
            start = sampler.peak
            tls.sendall(head(agent, f"GET /v1.41/containers/{name}/export HTTP/1.1"))
            status_line = stream.readline()
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            got = 0
            for _ in range(60):  # 3 s of a caller taking 64 KiB every 50 ms, about 4 MiB of the 256
                got += len(stream.read(2**16))
                time.sleep(0.05)
            assert got >= 60 * 2**16
            grown = sampler.peak - start
        assert grown < 48, f"the agent grew by {grown:.0f} MiB for a caller that read {got / 2**20:.0f} MiB"
        # the caller left mid-stream: the agent still serves, on a fresh connection to the engine
        with tls_conn(agent) as (tls, stream):
            tls.sendall(head(agent, f"GET /v1.41/containers/{name}/json HTTP/1.1"))
            status, _, body = read_response(stream)
            assert status == 200 and json.loads(body)["Name"] == f"/{name}"
    finally:
        engine.cli("rm", "-f", name, check=False)
