"""Bodies go through byte for byte: Content-Encoding is the engine's business, never the agent's, and an
upload that ends early never leaves a half-written request on a kept-alive engine connection."""

from __future__ import annotations

import gzip
import io
import json
import socket
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import docker

from tools.agentproc import AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd


def build_context(marker: str) -> bytes:
    """A tar build context: a Dockerfile that needs no registry (busybox:local) and one file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", b"FROM busybox:local\nCOPY marker /marker\n"),
                           ("marker", marker.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _build(agent: AgentProcess, tag: str, body: bytes | AsyncIterator[bytes],
                 headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/v1.41/build?t={tag}&rm=1", data=body, ssl=insecure_context(),
                          headers={**agent.signer.headers(), "Content-Type": "application/x-tar", **headers}) as r:
            return r.status, (await r.read()).decode(errors="replace")


async def test_gzip_encoded_build_context_with_a_length(agent: AgentProcess, engine: PrivateDockerd) -> None:
    tag = f"gz-{uuid.uuid4().hex[:6]}:len"
    body = gzip.compress(build_context("with-length"))
    status, out = await _build(agent, tag, body, {"Content-Encoding": "gzip"})
    assert status == 200 and "errorDetail" not in out, out
    assert engine.cli("run", "--rm", tag, "cat", "/marker").stdout == "with-length"
    engine.cli("rmi", tag)


async def test_gzip_encoded_build_context_chunked(agent: AgentProcess, engine: PrivateDockerd) -> None:
    tag = f"gz-{uuid.uuid4().hex[:6]}:chunked"
    body = gzip.compress(build_context("chunked"))

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    status, out = await _build(agent, tag, pieces(), {"Content-Encoding": "gzip"})
    assert status == 200 and "errorDetail" not in out, out
    assert engine.cli("run", "--rm", tag, "cat", "/marker").stdout == "chunked"
    engine.cli("rmi", tag)


def test_docker_py_build_with_gzip(agent: AgentProcess, engine: PrivateDockerd, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM busybox:local\nCOPY marker /marker\n")
    (tmp_path / "marker").write_text("docker-py")
    client = docker.DockerClient(base_url=f"https://127.0.0.1:{agent.port}",
                                 tls=docker.tls.TLSConfig(verify=False), version="1.41")
    client.api.headers.update(agent.signer.headers())
    client.api.trust_env = False
    tag = f"gz-{uuid.uuid4().hex[:6]}:py"
    try:
        client.images.build(path=str(tmp_path), tag=tag, gzip=True, rm=True)
        assert engine.cli("run", "--rm", tag, "cat", "/marker").stdout == "docker-py"
    finally:
        client.close()
        engine.cli("rmi", "-f", tag, check=False)


def _send_truncated(agent: AgentProcess, path: str, announced: int, sent: bytes) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {announced}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in agent.signer.headers().items())
            + "\r\n")
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        with insecure_context().wrap_socket(sock) as tls:
            tls.sendall(head.encode() + sent)
    # closed here, 10 bytes into a body announced much longer


async def test_a_body_that_ends_early_does_not_poison_the_engine_connection(agent: AgentProcess) -> None:
    name = f"trunc-{uuid.uuid4().hex[:6]}"
    partial = json.dumps({"Image": "busybox:local", "Cmd": ["true"]})[:10].encode()
    for _ in range(3):
        _send_truncated(agent, f"/v1.41/containers/create?name={name}", 4096, partial)
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            async with s.post(f"{agent.url}/v1.41/containers/create?name={name}-{i}", ssl=insecure_context(),
                              headers=agent.signer.headers(),
                              json={"Image": "busybox:local", "Cmd": ["true"]}) as r:
                assert r.status == 201, await r.text()
            async with s.delete(f"{agent.url}/v1.41/containers/{name}-{i}", ssl=insecure_context(),
                                headers=agent.signer.headers()) as r:
                assert r.status == 204
        async with s.get(f"{agent.url}/v1.41/containers/{name}/json", ssl=insecure_context(),
                         headers=agent.signer.headers()) as r:
            assert r.status == 404  # the truncated creates never reached the engine as a whole request


async def test_console_websocket_sends_keepalive_pings(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "ping", env={"KEELSON_WEBSOCKET_PING": "300ms"})
    name = f"wsping-{uuid.uuid4().hex[:6]}"
    engine.cli("run", "-dit", "--name", name, "busybox:local", "sh")
    try:
        proc.start()
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{proc.url}/websocket/attach?id={name}", autoping=False,
                                    headers=proc.signer.headers(), ssl=insecure_context()) as ws:
                pings = 0
                while pings < 2:
                    msg = await ws.receive(timeout=30)
                    if msg.type is aiohttp.WSMsgType.PING:
                        pings += 1
                        await ws.pong(msg.data)
                    else:
                        assert msg.type is aiohttp.WSMsgType.TEXT, msg
                await ws.send_str("echo still-$((40+2))\n")
                text = ""
                while "still-42" not in text:
                    msg = await ws.receive(timeout=30)
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        text += msg.data
    finally:
        proc.stop()
        engine.cli("rm", "-f", name)
