"""Real `serf agent` children on loopback addresses; every one is stopped by PID, also on failure."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.cluster.serf import SerfMembership

# One /24 inside 127/8 that nothing else in this tree uses, so runs do not meet other loopback services.
_hosts = itertools.cycle(range(10, 250))

NodeFactory = Callable[..., Awaitable[SerfMembership]]


def free_address() -> tuple[str, int]:
    """A loopback IP with serf's port (TCP and UDP) free on it: 7946 if possible, else any."""
    for _ in range(240):
        ip = f"127.0.83.{next(_hosts)}"
        for port in (7946, 0):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((ip, port))
                except OSError:
                    continue
                chosen = tcp.getsockname()[1]
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    try:
                        udp.bind((ip, chosen))
                    except OSError:
                        continue
                return ip, chosen
    raise RuntimeError("no free loopback address for serf")


async def wait_until(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll with a generous upper bound: a bound on correctness, never an assertion on speed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {limit}s: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def serf_binary() -> str:
    path = shutil.which("serf")
    if path is None:
        pytest.fail("the serf binary is missing (Debian package `serf`)")
    return path


@pytest.fixture
async def make_node(serf_binary: str, tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start SerfMembership nodes on distinct loopback addresses; all are closed at the end."""
    nodes: list[SerfMembership] = []

    async def factory(name: str, **kwargs: object) -> SerfMembership:
        ip, port = free_address()
        node = SerfMembership(
            node_name=name,
            bind_ip=ip,
            bind_port=port,
            data_dir=tmp_path / name,
            serf_binary=serf_binary,
            hostname="test",
            **kwargs,  # type: ignore[arg-type]
        )
        nodes.append(node)
        await node.start()
        return node

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for node in nodes:
            pid = node.pid
            try:
                await node.close()
            except BaseException as exc:  # keep stopping the others
                errors.append(exc)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # our own child, by its PID
        if errors:
            raise errors[0]
