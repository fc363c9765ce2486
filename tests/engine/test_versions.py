"""What Portainer really sends, on one engine: version prefixes on agent routes, API versions the engine
does not support, normalised paths, refused targets, the engine's range followed across a restart, and the
Go agent's options (LOG_MODE=NOCOLOR, command-line flags, certificates that appear after start)."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from agent.tls import self_signed_pem
from tools.agentproc import AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd, new_run_id

AGENT_HEADERS = ("Portainer-Agent", "Portainer-Agent-API-Version", "Portainer-Agent-Platform")


async def call(agent: AgentProcess, method: str, path: str, signed: bool = True,
               headers: dict[str, str] | None = None, **kw: object) -> tuple[int, CIMultiDict[str], bytes]:
    hdrs = {**(agent.signer.headers() if signed else {}), **(headers or {})}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, agent.url + path, headers=hdrs, ssl=insecure_context(),
                             **kw) as r:  # type: ignore[arg-type]
            return r.status, CIMultiDict(r.headers), await r.read()


def poll_until(check: Callable[[], bool], timeout: float) -> bool:
    """A bounded wait for what another process does (no event to wait on across processes); the last look."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(check())


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def adapted(agent: AgentProcess, direction: str) -> float:
    _, _, body = await call(agent, "GET", "/metrics")
    return metric(body.decode(), "keelson_api_version_adapted_total", direction=direction)


async def test_agent_routes_under_portainers_version_prefix(agent: AgentProcess) -> None:
    status, headers, body = await call(agent, "GET", "/v1.41/ping", signed=False)
    assert status == 204 and body == b""
    assert all(h in headers for h in AGENT_HEADERS)
    status, _, body = await call(agent, "GET", "/v1.41/agents")
    assert status == 503
    assert json.loads(body) == {
        "message": "Agent management is not available when running the agent on a standalone engine",
        "details": "Agent management is disabled"}
    status, _, body = await call(agent, "GET", "/v1.41/host/info")
    assert status == 200 and set(json.loads(body)) == {"PCIDevices", "PhysicalDisks"}
    agent.cli("volume", "create", "vprefix")
    status, _, body = await call(agent, "GET", "/v1.41/browse/ls?volumeID=vprefix&path=/")
    assert status == 200 and json.loads(body) == []
    status, _, body = await call(agent, "GET", "/v1.41/v1/browse/vprefix/ls?path=/")
    assert status == 200 and json.loads(body) == []
    status, _, _ = await call(agent, "POST", "/v1.41/agents")
    assert status == 405


async def test_versions_the_engine_does_not_support_are_adapted(agent: AgentProcess) -> None:
    status, _, body = await call(agent, "GET", "/version")
    low, high = json.loads(body)["MinAPIVersion"], json.loads(body)["ApiVersion"]
    down_before, up_before = await adapted(agent, "down"), await adapted(agent, "up")
    for version in ("1.44", "1.45", "9.99"):
        status, _, body = await call(agent, "GET", f"/v{version}/containers/json?all=1")
        assert status == 200 and isinstance(json.loads(body), list), (version, body)
        status, headers, body = await call(agent, "GET", f"/v{version}/version")
        assert status == 200
        # the engine answered (it refuses a version above its own with 400 "client version ... is too new")
        assert json.loads(body)["ApiVersion"] == high and headers["Api-Version"] == high
    status, _, body = await call(agent, "GET", "/v1.5/version")  # below the engine's minimum
    assert status == 200 and json.loads(body)["MinAPIVersion"] == low
    assert await adapted(agent, "down") == down_before + 6
    assert await adapted(agent, "up") == up_before + 1
    # a supported version goes through untouched: the engine's answer says which one it served
    status, _, body = await call(agent, "GET", "/v1.24/containers/json")
    assert status == 200 and await adapted(agent, "down") == down_before + 6


async def test_one_normalised_path_is_routed_and_forwarded(agent: AgentProcess) -> None:
    status, _, body = await call(agent, "GET", "/v1.41/containers/../version")
    assert status == 200 and "ApiVersion" in json.loads(body)
    status, _, body = await call(agent, "GET", "//v1.41//containers///json?all=1")
    assert status == 200 and isinstance(json.loads(body), list)
    status, _, body = await call(agent, "GET", "/v1.41/../../_ping")
    assert status == 200 and body == b"OK"
    # a name that looks like a version stays a name: the engine's own 404 names it
    status, _, body = await call(agent, "GET", "/v1.41/containers/v1.2/json")
    assert status == 404 and "v1.2" in json.loads(body)["message"]


def raw_request(agent: AgentProcess, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        with insecure_context().wrap_socket(sock) as tls:
            tls.sendall(head.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data


def test_absolute_form_targets_are_refused(agent: AgentProcess) -> None:
    signature = "".join(f"{k}: {v}\r\n" for k, v in agent.signer.headers().items())
    for target in ("http://127.0.0.1/containers/json", "https://docker/v1.41/info"):
        answer = raw_request(agent, f"GET {target} HTTP/1.1\r\nHost: x\r\n{signature}Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


async def test_engine_range_is_read_again_after_an_engine_restart(tmp_path: Path) -> None:
    run_id = new_run_id()
    # Its own network namespace, so that this engine makes no bridge or firewall rule on the host.
    engine = PrivateDockerd(root=Path(f"/tmp/kls-vr-{run_id}"), netns=f"kls-vr-{run_id}")
    engine.start()
    proc = AgentProcess(engine.host, tmp_path / "agent", env={"KEELSON_WORKERS": "1"})  # one reader to count
    try:
        proc.start()
        assert len(re.findall("engine API versions", proc.log())) == 1
        engine.stop()
        # no engine: a request for it is a Docker-shaped 502 that names it, logged with its code
        status, headers, body = await call(proc, "GET", "/v1.45/info")
        assert status == 502 and headers["Content-Type"].startswith("application/json"), (status, body)
        assert "Unable to reach docker" in json.loads(body)["message"]
        assert "PROXY_DOCKER_UNREACHABLE" in proc.log()
        # a new engine on the same socket: a restart or an upgrade
        engine = PrivateDockerd(root=engine.root, netns=engine.netns)
        engine.start()
        poll_until(lambda: len(re.findall("engine API versions", proc.log())) >= 2, 30)
        assert len(re.findall("engine API versions", proc.log())) >= 2, proc.log()
        status, _, _ = await call(proc, "GET", "/v1.45/info")
        assert status == 200
    finally:
        proc.stop()
        engine.stop()


def test_log_mode_nocolor_and_command_line_flags(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "nocolor", env={"LOG_MODE": "NOCOLOR"})
    try:
        proc.start()
        assert "\x1b[" not in proc.log() and "agent listening" in proc.log()
    finally:
        proc.stop()
    # The Go agent's flags win over the variables they mirror (a bad AGENT_PORT would stop start-up)
    proc = AgentProcess(engine.host, tmp_path / "flags", env={"LOG_MODE": "PRETTY", "AGENT_PORT": "notaport"})
    proc.args = ["--log-mode=JSON", "--port", str(proc.port)]
    try:
        proc.start()
        lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
        assert any("agent listening" in line["message"] for line in lines)
    finally:
        proc.stop()


def test_certificate_files_that_appear_after_start(engine: PrivateDockerd, tmp_path: Path) -> None:
    cert, key = tmp_path / "later" / "cert.pem", tmp_path / "later" / "key.pem"
    proc = AgentProcess(engine.host, tmp_path / "mtls", env={
        "MTLS_SSL_CERT": str(cert), "MTLS_SSL_KEY": str(key), "MTLS_CERT_RETRY_INTERVAL": "200ms"})
    try:
        proc.start(wait=False)
        poll_until(lambda: "waiting for the mTLS certificate" in proc.log(), 20)
        assert "waiting for the mTLS certificate" in proc.log()
        assert proc.proc is not None and proc.proc.poll() is None
        cert_pem, key_pem = self_signed_pem(["127.0.0.1"])
        cert.parent.mkdir()
        key.write_bytes(key_pem)
        cert.write_bytes(cert_pem)
        proc.wait_ready()
        ctx = insecure_context()
        with socket.create_connection(("127.0.0.1", proc.port)) as sock, ctx.wrap_socket(sock) as tls:
            served = tls.getpeercert(binary_form=True)
        assert served is not None and ssl.DER_cert_to_PEM_cert(served).encode().strip() == cert_pem.strip()
    finally:
        proc.stop()


@pytest.mark.parametrize("env", [{"EDGE_ASYNC": "1"}, {"EDGE_GROUPS": "1:x"}])
def test_go_option_errors_stop_start_up(engine: PrivateDockerd, tmp_path: Path, env: dict[str, str]) -> None:
    proc = AgentProcess(engine.host, tmp_path / "bad", env=env)
    proc.start(wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(timeout=30) == 2
    assert proc.log().startswith(f"CONFIG_INVALID {next(iter(env))}:")
