"""Hostile clients against a real agent: each probe of an attacker, with bounds on memory (sampled from
/proc) and descriptors (counted in /proc/<pid>/fd). These are bounds on resources, never on timings; waits
are bounded polls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.engine.test_versions import poll_until
from tools.agentproc import AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd
from tools.procs import cmdline, descendants, tree_pss_kib

MiB = 2**20


def _agent_pids(pid: int) -> list[int]:
    """The agent's processes: the one started and its workers (one per CPU by default)."""
    return [pid, *(p for p in descendants(pid) if "serf" not in " ".join(cmdline(p)))]


def rss_mib(pid: int) -> float:
    """Memory of the agent's processes: PSS summed (pages the forked workers share count once)."""
    return tree_pss_kib(pid) / 1024


def open_fds(pid: int) -> int:
    """Descriptors summed over the agent's processes."""
    total = 0
    for p in _agent_pids(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


class Sampler:
    """The agent's peak RSS, sampled every 20 ms in a thread while a probe runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def hostile_agent(engine: PrivateDockerd, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(engine.host, tmp_path / "agent", env={"KEELSON_HEADER_TIMEOUT": "3s", "LOG_LEVEL": "INFO"})
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


async def ping(agent: AgentProcess) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/ping", ssl=insecure_context(),
                         timeout=aiohttp.ClientTimeout(total=20)) as r:
            return r.status


async def endless_head(agent: AgentProcess, lines: int = 126, size: int = 65000) -> None:
    """The probe: a request head of `lines` huge header lines that never ends."""
    ctx = insecure_context()
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=ctx)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            filler = b"a" * size
            for i in range(lines):
                writer.write(b"X-H%d: " % i + filler + b"\r\n")
                await writer.drain()
            await reader.read(1)  # hold the connection until the agent closes it
        finally:
            writer.close()


async def test_huge_unfinished_heads_are_bounded(hostile_agent: AgentProcess) -> None:
    assert hostile_agent.proc is not None
    pid = hostile_agent.proc.pid
    base_fds = open_fds(pid)
    with Sampler(pid) as sampler:
        probes = [asyncio.create_task(endless_head(hostile_agent)) for _ in range(500)]
        await asyncio.sleep(1)
        assert await ping(hostile_agent) == 204  # an honest client gets through while they push
        await asyncio.wait_for(asyncio.gather(*probes), 120)
    print(f"500 endless heads: peak memory {sampler.peak:.0f} MiB (PSS), descriptors {open_fds(pid)} (base {base_fds})")
    assert sampler.peak < 200, f"agent peak memory {sampler.peak:.0f} MiB (PSS) with 500 huge unfinished heads"
    assert poll_until(lambda: open_fds(pid) <= base_fds + 5, 10), (open_fds(pid), base_fds)
    assert await ping(hostile_agent) == 204
    log = hostile_agent.log()
    assert "LIMIT_HEAD_TOO_LARGE" in log or "LIMIT_HEAD_BUDGET" in log


async def test_connections_that_never_send_a_head_are_closed(hostile_agent: AgentProcess) -> None:
    assert hostile_agent.proc is not None
    pid = hostile_agent.proc.pid
    base_fds = open_fds(pid)
    ctx = insecure_context()
    conns = [await asyncio.open_connection("127.0.0.1", hostile_agent.port, ssl=ctx) for _ in range(300)]
    try:
        assert open_fds(pid) >= base_fds + 250
        assert await ping(hostile_agent) == 204
        # the header timeout (3 s here, 30 s by default) closes every one of them
        assert await asyncio.to_thread(poll_until, lambda: open_fds(pid) <= base_fds + 5, 30), open_fds(pid)
        ends = await asyncio.gather(*(reader.read(1) for reader, _ in conns), return_exceptions=True)
        assert all(end in (b"",) or isinstance(end, (ConnectionError, ssl.SSLError)) for end in ends)
    finally:
        for _, writer in conns:
            writer.close()


def test_unproven_connections_are_capped_oldest_first(engine: PrivateDockerd, tmp_path: Path) -> None:
    import socket

    proc = AgentProcess(engine.host, tmp_path / "cap", env={"KEELSON_MAX_UNPROVEN": "50"})
    socks: list[socket.socket] = []
    try:
        proc.start()
        assert proc.proc is not None
        base_fds = open_fds(proc.proc.pid)
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", proc.port)))
        assert poll_until(lambda: open_fds(proc.proc.pid) <= base_fds + 55, 10), open_fds(proc.proc.pid)  # type: ignore[union-attr]
        assert asyncio.run(ping(proc)) == 204
        # the newest are the ones kept: the first ones were closed by the agent
        socks[0].settimeout(5)
        assert socks[0].recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
        proc.stop()


def test_sigterm_with_streams_open_ends_them_and_exits(engine: PrivateDockerd, tmp_path: Path) -> None:
    import signal
    import subprocess

    from tools.dockerd import DOCKER_CLI

    proc = AgentProcess(engine.host, tmp_path / "term")
    name = f"term-{os.getpid()}-{int(time.time())}"
    engine.cli("run", "-dit", "--name", name, "busybox:local", "sh")
    clients: list[subprocess.Popen[bytes]] = []
    try:
        proc.start()
        assert proc.proc is not None
        env = {"DOCKER_CERT_PATH": str(proc.config_dir), "PATH": os.environ["PATH"]}
        base = [DOCKER_CLI, "--config", str(proc.config_dir), "--tls", "-H", f"tcp://127.0.0.1:{proc.port}"]
        for args in (["events"], ["logs", "-f", name], ["attach", name]):
            clients.append(subprocess.Popen([*base, *args], env=env, stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2)  # the three streams are established
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.proc.wait(timeout=10)  # Docker's and Swarm's grace period before SIGKILL
        elapsed = time.monotonic() - started
        assert code == 0
        print(f"SIGTERM with events, logs -f and attach open: exit after {elapsed:.2f}s")
        # a bound far from the limit (the agent stops in well under a second): what matters is that open
        # streams do not hold the process until the grace period
        assert elapsed < 5, f"stopped in {elapsed:.1f}s"
        assert "agent stopped in" in proc.log()
        for client in clients:  # every stream was ended by the agent, so its client ends too
            assert client.wait(timeout=10) is not None
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        proc.stop()
        engine.cli("rm", "-f", name)


def test_a_port_in_use_ends_start_up_with_one_line(engine: PrivateDockerd, tmp_path: Path) -> None:
    import socket

    proc = AgentProcess(engine.host, tmp_path / "busy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", proc.port))
        taken.listen()
        proc.start(wait=False)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=30) == 1
    log = proc.log()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "START_FAILED" in line and str(proc.port) in line]


def test_a_malformed_cluster_address_is_a_configuration_error(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "addr", env={"AGENT_CLUSTER_ADDR": "tasks..agent"})
    proc.start(wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(timeout=30) == 2
    assert proc.log().startswith("CONFIG_INVALID AGENT_CLUSTER_ADDR:")


async def test_repeated_refusals_are_summarised(hostile_agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            async with s.get(hostile_agent.url + "/containers/json", ssl=insecure_context()) as r:
                assert r.status == 403
    lines = [line for line in hostile_agent.log().splitlines() if "AUTH_MISSING_SIGNATURE" in line]
    assert 1 <= len(lines) <= 3, lines  # the first in full, then one line with the count per 10 s


async def body_of(size: int, piece: int = 2**20) -> Any:
    chunk = b"x" * piece
    sent = 0
    while sent < size:
        yield chunk
        sent += piece


async def test_bodies_the_agent_reads_itself_are_bounded(hostile_agent: AgentProcess,
                                                         engine: PrivateDockerd) -> None:
    assert hostile_agent.proc is not None
    engine.cli("volume", "create", "hostile-rename")
    url = hostile_agent.url + "/browse/rename?volumeID=hostile-rename"
    headers = hostile_agent.signer.headers()
    with Sampler(hostile_agent.proc.pid) as sampler:
        async with aiohttp.ClientSession() as s:
            # declared too large: refused from its head
            async with s.put(url, ssl=insecure_context(), data=b"{}",
                             headers={**headers, "Content-Length": str(300 * MiB)}, skip_auto_headers=()) as r:
                assert r.status == 413
        async with aiohttp.ClientSession() as s:
            # chunked: refused once 1 MiB has come, never read whole
            try:
                async with s.put(url, ssl=insecure_context(), data=body_of(300 * MiB), headers=headers) as r:
                    assert r.status == 413
                    assert (await r.json())["message"].startswith("the request body is larger than")
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                pass  # the agent closed the connection while the client was still sending
    print(f"300 MiB bodies to /browse/rename: peak memory {sampler.peak:.0f} MiB (PSS)")
    assert sampler.peak < 150, f"peak memory {sampler.peak:.0f} MiB (PSS)"
    assert await ping(hostile_agent) == 204
    engine.cli("volume", "rm", "-f", "hostile-rename")


async def test_a_hijack_request_streams_its_body(hostile_agent: AgentProcess, engine: PrivateDockerd) -> None:
    assert hostile_agent.proc is not None
    name = f"sink-{os.getpid()}"
    engine.cli("run", "-di", "--name", name, "busybox:local", "sh", "-c", "cat > /dev/null")
    try:
        with Sampler(hostile_agent.proc.pid) as sampler:
            ctx = insecure_context()
            reader, writer = await asyncio.open_connection("127.0.0.1", hostile_agent.port, ssl=ctx)
            size = 300 * MiB
            head = (f"POST /containers/{name}/attach?stream=1&stdin=1 HTTP/1.1\r\nHost: x\r\n"
                    f"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {size}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in hostile_agent.signer.headers().items()) + "\r\n")
            writer.write(head.encode())
            chunk = b"y" * MiB
            for _ in range(size // MiB):
                writer.write(chunk)
                await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            assert answer.startswith(b"HTTP/1.1 101"), answer
            writer.close()
        print(f"300 MiB hijack body: peak memory {sampler.peak:.0f} MiB (PSS)")
        assert sampler.peak < 150, f"peak memory {sampler.peak:.0f} MiB (PSS) for a 300 MiB hijack body"
    finally:
        engine.cli("rm", "-f", name)


async def test_a_kept_alive_connection_that_stalls_in_its_next_head_is_closed(hostile_agent: AgentProcess) -> None:
    """The head timeout holds for every request of a connection, not only its first: a signed request is
    answered, then half a head is sent and never finished; the agent closes the connection (3 s here)."""
    from tests.engine.test_front import head

    reader, writer = await asyncio.open_connection("127.0.0.1", hostile_agent.port, ssl=insecure_context())
    try:
        for _ in range(2):  # two answered requests: the connection is kept alive between them
            writer.write(head(hostile_agent, "GET /_ping HTTP/1.1"))
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert await asyncio.wait_for(reader.readexactly(2), 20) == b"OK"
        writer.write(b"GET /_ping HTTP/1.1\r\nHost: agent\r\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(1), 60) == b""  # closed by the agent, not answered
    finally:
        writer.close()
    assert "LIMIT_HEAD_TIMEOUT" in hostile_agent.log()
