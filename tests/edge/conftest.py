"""Shared Edge fixtures: an "agent API" stand-in on loopback, a chisel test server and Debian's sshd."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge.tunnel.base import TunnelConfig
from tests.edge.chisel_server import ChiselTestServer
from tests.edge.portainer_standin import PortainerStandin
from tools.agentproc import AgentProcess
from tools.dockerd import PrivateDockerd
from tools.procs import descendants

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"


def free_port() -> int:
    """A currently unused loopback TCP port (tiny race; good enough for tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def blob(size: int) -> bytes:
    """Deterministic non-repeating bytes, so corruption anywhere in a big transfer shows."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class AgentAPI:
    host: str
    port: int


@pytest.fixture
async def agent_api() -> AsyncIterator[AgentAPI]:
    """Tiny HTTP server playing the agent API: /ping, /echo (body back), /blob?size=N."""

    async def ping(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    async def get_blob(request: web.Request) -> web.Response:
        return web.Response(body=blob(int(request.query["size"])), content_type="application/octet-stream")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/ping", ping)
    app.router.add_post("/echo", echo)
    app.router.add_get("/blob", get_blob)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield AgentAPI("127.0.0.1", runner.addresses[0][1])
    finally:
        await runner.cleanup()


@dataclass
class ChiselStand:
    server: ChiselTestServer
    port: int
    """The one server-side port the user may ask for (Portainer's ^R:0.0.0.0:<port>$)."""
    user: str
    password: str

    def config(self, api: AgentAPI, **overrides: object) -> TunnelConfig:
        values: dict[str, object] = {
            "server": self.server.url,
            "remote_port": self.port,
            "local_host": api.host,
            "local_port": api.port,
            "username": self.user,
            "password": self.password,
            "fingerprint": self.server.fingerprint,
            "connect_timeout": 10.0,
            "keepalive_interval": 0.0,
        }
        values.update(overrides)
        return TunnelConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def chisel() -> AsyncIterator[ChiselStand]:
    port = free_port()
    user, password = "Xy7kQ2pA", "p4ssW0rd"  # Portainer uses 8 random characters for both
    server = ChiselTestServer({user: (password, f"^R:0.0.0.0:{port}$")})
    await server.start()
    try:
        yield ChiselStand(server, port, user, password)
    finally:
        await server.stop()


# --- OpenSSH -------------------------------------------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    fingerprint: str
    """Chisel form (padded base64 SHA-256), derived from ``ssh-keygen -lf`` output."""
    client_key: Path
    user: str


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("sshd did not start listening")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """Debian's sshd on 127.0.0.1 with its own config and host key; key auth for the current user."""
    if not (os.path.exists(SSHD) and os.path.exists(SSH_KEYGEN)):
        pytest.skip("openssh-server is not installed (dev.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation)")
    # sshd refuses to start without its privilege separation directory; the Debian package expects
    # systemd to create it, which containers lack. Created if missing and left in place (other sshds use it).
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "client_key")], check=True)
    shutil.copy(tmp_path / "client_key.pub", tmp_path / "authorized_keys")
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"HostKey {tmp_path / 'host_key'}",
                f"PidFile {tmp_path / 'sshd.pid'}",
                f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}",
                "StrictModes no",  # the key lives under /tmp (world-writable parent)
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "X11Forwarding no",
                "PermitTTY no",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    log = (tmp_path / "sshd.log").open("wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port)], stdout=log, stderr=log)
    try:
        _wait_port(port, proc)
        out = subprocess.run(
            [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(tmp_path / "host_key.pub")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        unpadded = out.split()[1].removeprefix("SHA256:")
        fingerprint = unpadded + "=" * (-len(unpadded) % 4)
        yield Sshd(port, fingerprint, tmp_path / "client_key", pwd.getpwuid(os.geteuid()).pw_name)
    finally:
        # Children first (sshd reaps them), then the listener, all by PID.
        for child in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def eventually(predicate: object, timeout: float = 5.0) -> None:
    """Poll a zero-argument callable until it is truthy."""
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# --- Edge mode end to end: stand-in Portainer + chisel server + real agent processes ---------------------------

EDGE_ID = "kls-edge-7f3a9c"
"""EDGE_ID of the test agents (Portainer encrypts tunnel credentials with it)."""


@dataclass
class EdgeStand:
    portainer: PortainerStandin
    chisel: ChiselTestServer


@pytest.fixture
async def stand() -> AsyncIterator[EdgeStand]:
    """Portainer stand-in (checkin 1 s) with its in-process chisel server, both on loopback."""
    chisel = ChiselTestServer({})
    await chisel.start()
    portainer = PortainerStandin(chisel, checkin=1)
    await portainer.start()
    try:
        yield EdgeStand(portainer, chisel)
    finally:
        await portainer.stop()
        await chisel.stop()


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def edge_agents(engine: PrivateDockerd, tmp_path: Path) -> Iterator[AgentFactory]:
    """Makes (not starts) Edge agents on the session's dockerd; every one made is stopped by PID afterwards."""
    procs: list[AgentProcess] = []

    def make(env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        proc = AgentProcess(engine.host, tmp_path / name, scheme="http", env={
            "EDGE": "1",
            "EDGE_ID": EDGE_ID,
            "KEELSON_ADVERTISE_ADDR": "127.0.0.1",
            "KEELSON_EDGE_JOB_RUNNER": "container",  # the host's cron is not the test's to touch
            "KEELSON_EDGE_JOB_IMAGE": "busybox:local",
            "KEELSON_EDGE_POLL_INTERVAL": "1s",
            "KEELSON_EDGE_POLL_MAX_BACKOFF": "2s",
            "EDGE_SERVER_HOST": "127.0.0.1",
            "EDGE_SERVER_PORT": str(free_port()),
            **(env or {}),
        })
        procs.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in procs:
            proc.stop()


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition",
                   proc: AgentProcess | None = None) -> None:
    """Poll a sync or async predicate until truthy; the failure names what was awaited (and the agent log)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            tail = f"\nagent log:\n{agent_log(proc)[-3000:]}" if proc is not None else ""
            raise AssertionError(f"timed out waiting for {what}{tail}")
        await asyncio.sleep(0.1)


def agent_log(proc: AgentProcess | None) -> str:
    if proc is None:
        return ""
    try:
        return proc.log_path.read_text(errors="replace")
    except OSError:
        return ""


async def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0,
                   ) -> tuple[int, bytes] | None:
    """(status, body), or None when nothing answers."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.get(url, headers=headers) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def start_agent(proc: AgentProcess, ready_status: int = 204, timeout: float = 30.0) -> AgentProcess:
    """Start without blocking the event loop (the stand-in lives on it) and wait for /ping's answer."""
    proc.start(wait=False)

    async def ready() -> bool:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.proc.returncode}:\n{agent_log(proc)[-3000:]}")
        got = await http_get(f"{proc.url}/ping", timeout=2.0)
        return got is not None and got[0] == ready_status

    await wait_for(ready, timeout, f"agent /ping -> {ready_status}", proc)
    return proc
