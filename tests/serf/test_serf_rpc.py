"""SerfRPCClient against a real `serf agent`: errors surface as exceptions, streams deliver records."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.cluster.serf import SerfMembership
from agent.cluster.serf_rpc import Record, SerfRPCClient, SerfRPCError, decode_addr
from tests.serf.conftest import NodeFactory, free_address


@pytest.fixture
async def node(make_node: NodeFactory) -> SerfMembership:
    return await make_node("rpc", extra_tags={"Extra": "x"})


@pytest.fixture
async def client(node: SerfMembership) -> AsyncIterator[SerfRPCClient]:
    assert node.rpc_port is not None
    rpc = await SerfRPCClient.connect("127.0.0.1", node.rpc_port)
    try:
        yield rpc
    finally:
        await rpc.close()


def test_decode_addr() -> None:
    assert decode_addr(bytes([10, 1, 2, 3])) == "10.1.2.3"
    assert decode_addr(ipaddress.IPv6Address("::ffff:10.1.2.3").packed) == "10.1.2.3"
    assert decode_addr(ipaddress.IPv6Address("fd00::1").packed) == "fd00::1"
    assert decode_addr(b"") == ""
    assert decode_addr(None) == ""


async def test_members_decode_own_node(node: SerfMembership, client: SerfRPCClient) -> None:
    members = await client.members()
    assert len(members) == 1
    me = members[0]
    assert (me.name, me.addr, me.port, me.status) == (node.serf_node_name, node.bind_ip, node.bind_port, "alive")
    assert me.name.startswith("rpc-test-")
    assert me.tags["Extra"] == "x" and me.tags["NodeName"] == "rpc"


async def test_stream_delivers_records_and_stop(client: SerfRPCClient) -> None:
    queue: asyncio.Queue[Record] = asyncio.Queue()
    seq = await client.stream(queue.put_nowait)
    await client.tags({"EdgeKeySet": "set"})
    async with asyncio.timeout(30):  # serf coalesces member events for 1-3 s
        record = await queue.get()
    assert record["Event"] == "member-update"
    assert record["Members"][0]["Tags"]["EdgeKeySet"] == "set"
    await client.stop(seq)
    await client.tags(delete=["EdgeKeySet"])  # deletes apply first: {"EdgeKeySet": ""} would keep it, empty
    assert "EdgeKeySet" not in (await client.members())[0].tags


async def test_failed_join_raises_with_serf_message(client: SerfRPCClient) -> None:
    ip, port = free_address()
    with pytest.raises(SerfRPCError, match="Failed to join"):
        await client.join([f"{ip}:{port}"])
    assert len(await client.members()) == 1  # the connection stays usable


async def test_unknown_command_raises_and_closes(client: SerfRPCClient) -> None:
    with pytest.raises(SerfRPCError, match="Unsupported command"):
        await client.call("no-such-command")
    async with asyncio.timeout(10):
        await client.wait_closed()  # serf drops the connection after an unknown command
    with pytest.raises(SerfRPCError):
        await client.members()


async def test_handshake_errors(node: SerfMembership) -> None:
    assert node.rpc_port is not None
    raw = await SerfRPCClient.connect("127.0.0.1", node.rpc_port, handshake=False)
    try:
        with pytest.raises(SerfRPCError, match="Unsupported IPC version"):
            await raw.handshake(version=2)
        await raw.handshake()
        with pytest.raises(SerfRPCError, match="Handshake already performed"):
            await raw.handshake()
        assert len(await raw.members()) == 1
    finally:
        await raw.close()

    raw = await SerfRPCClient.connect("127.0.0.1", node.rpc_port, handshake=False)
    try:
        with pytest.raises(SerfRPCError, match="Handshake required"):
            await raw.members()
    finally:
        await raw.close()


@pytest.fixture
async def auth_agent(serf_binary: str, tmp_path: Path) -> AsyncIterator[int]:
    """A bare serf agent whose RPC wants a key (only settable in its config file); stopped by PID."""
    ip, port = free_address()
    _, rpc_port = free_address()
    config = tmp_path / "auth.json"
    config.write_text(json.dumps({"rpc_auth": "s3cret"}))
    proc = await asyncio.create_subprocess_exec(
        serf_binary, "agent", "-node", "auth", "-bind", f"{ip}:{port}", "-rpc-addr", f"127.0.0.1:{rpc_port}",
        "-config-file", str(config), "-log-level", "warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield rpc_port
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_auth(auth_agent: int) -> None:
    async def connect(key: str | None) -> SerfRPCClient:
        return await SerfRPCClient.connect("127.0.0.1", auth_agent, auth_key=key)

    async def up() -> bool:
        with contextlib.suppress(OSError):
            rpc = await connect("s3cret")
            await rpc.close()
            return True
        return False

    ok = False
    for _ in range(100):
        if ok := await up():
            break
        await asyncio.sleep(0.1)
    assert ok, "serf RPC did not come up"

    rpc = await connect(None)
    try:
        with pytest.raises(SerfRPCError, match="Authentication required"):
            await rpc.members()
    finally:
        await rpc.close()
    with pytest.raises(SerfRPCError, match="Invalid authentication token"):
        await connect("wrong")
    rpc = await connect("s3cret")
    try:
        assert [m.name for m in await rpc.members()] == ["auth"]
    finally:
        await rpc.close()
