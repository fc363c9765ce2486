"""Signature checks against a real agent process: pinning, secret mode, garbage, security shutdown."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.auth import HEADER_PUBLIC_KEY, HEADER_SIGNATURE
from agent.workers import available_cpus
from tools.agentproc import REPO, AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd
from tools.signer import Signer

AGENT_HEADERS = {"Portainer-Agent": "2.23.0", "Portainer-Agent-API-Version": "2", "Portainer-Agent-Platform": "1"}
MISSING = {"message": "Missing request signature headers", "details": "Unauthorized"}
INVALID = {"message": "Invalid request signature", "details": "Unauthorized"}


async def _get(agent: AgentProcess, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, object]:
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + path, headers=headers or {}, ssl=insecure_context()) as r:
            body = await r.read()
            data = json.loads(body) if body and "json" in r.headers.get("Content-Type", "") else body or None
            return r.status, dict(r.headers), data


def _has_agent_headers(headers: dict[str, str]) -> None:
    for k, v in AGENT_HEADERS.items():
        assert headers.get(k) == v, k


async def test_ping_is_public_and_carries_agent_headers(agent: AgentProcess) -> None:
    status, headers, body = await _get(agent, "/ping")
    assert (status, body) == (204, None)
    _has_agent_headers(headers)


@pytest.mark.parametrize("order", [("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                   ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256")])
async def test_tls_takes_the_clients_cipher_order(agent: AgentProcess, order: tuple[str, str]) -> None:
    """Go clients put AES-128-GCM first on AES hardware and the Go agent takes it; so does this one (the
    server-preference option is off, the same for TLS 1.3; 1.2 is used here because Python's client can only
    order 1.2 suites)."""
    ctx = insecure_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(order))
    _, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=ctx)
    try:
        assert writer.get_extra_info("cipher")[0] == order[0]
    finally:
        writer.close()


async def test_unsigned_forged_garbage_and_second_key_get_403(fresh_agent: AgentProcess) -> None:
    agent = fresh_agent
    good = agent.signer.headers()
    # unsigned
    status, headers, body = await _get(agent, "/containers/json")
    assert (status, body) == (403, MISSING)
    _has_agent_headers(headers)
    status, _, body = await _get(agent, "/containers/json", {HEADER_PUBLIC_KEY: good[HEADER_PUBLIC_KEY]})
    assert (status, body) == (403, MISSING)
    # forged first request: a valid key with a signature of another message must not pin that key
    forged = {HEADER_PUBLIC_KEY: good[HEADER_PUBLIC_KEY], HEADER_SIGNATURE: agent.signer.sign("other")}
    assert (await _get(agent, "/containers/json", forged))[::2] == (403, INVALID)
    intruder = Signer()
    forged2 = {HEADER_PUBLIC_KEY: intruder.public_key_hex, HEADER_SIGNATURE: agent.signer.sign()}
    assert (await _get(agent, "/containers/json", forged2))[::2] == (403, INVALID)
    # garbage of every kind
    for pk, sig in [
        ("zz-not-hex", good[HEADER_SIGNATURE]),
        ("00" * 91, good[HEADER_SIGNATURE]),
        (good[HEADER_PUBLIC_KEY], "!!!not base64!!!"),
        (good[HEADER_PUBLIC_KEY], "QUJD"),  # decodes to 3 bytes, not 64
        (good[HEADER_PUBLIC_KEY], "A" * 5000),
        ("ab" * 3000, good[HEADER_SIGNATURE]),
    ]:
        status, headers, body = await _get(agent, "/containers/json", {HEADER_PUBLIC_KEY: pk, HEADER_SIGNATURE: sig})
        assert (status, body) == (403, INVALID), (pk[:20], sig[:20])
        _has_agent_headers(headers)
    # the genuine key still pairs after all that, then a second valid key is refused
    status, _, body = await _get(agent, "/containers/json", good)
    assert status == 200 and isinstance(body, list)
    assert (await _get(agent, "/containers/json", intruder.headers()))[::2] == (403, INVALID)
    assert (await _get(agent, "/containers/json", good))[0] == 200
    # still up
    assert (await _get(agent, "/ping"))[0] == 204


async def test_signature_is_verified_once_per_key(fresh_agent: AgentProcess) -> None:
    headers = fresh_agent.signer.headers()
    for _ in range(20):
        assert (await _get(fresh_agent, "/_ping", headers))[0] == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(fresh_agent.url + "/metrics", headers=headers, ssl=insecure_context()) as r:
            text = await r.text()
    line = next(ln for ln in text.splitlines() if ln.startswith("keelson_signature_verifications "))
    # once per key in each worker process that served one of the requests (one per CPU by default)
    assert 1.0 <= float(line.split()[1]) <= available_cpus()


async def test_secret_mode_checks_every_key_without_pinning(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "a", env={"AGENT_SECRET": "s3cr3t"}).start()
    try:
        a, b = Signer(), Signer()
        assert (await _get(proc, "/_ping", a.headers("s3cr3t")))[0] == 200
        assert (await _get(proc, "/_ping", b.headers("s3cr3t")))[0] == 200  # no pinning in secret mode
        assert (await _get(proc, "/_ping", a.headers()))[::2] == (403, INVALID)  # signed Portainer-App
        assert (await _get(proc, "/_ping", a.headers("wrong")))[::2] == (403, INVALID)
    finally:
        proc.stop()


async def test_security_shutdown_closes_the_api_but_not_the_process(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "a", env={"AGENT_SECRET_TIMEOUT": "2s"}).start()
    try:
        refused = False
        for _ in range(200):  # bounded wait for the shutdown; no assertion on how fast it came
            try:
                await _get(proc, "/ping")
            except aiohttp.ClientConnectionError:
                refused = True
                break
            await asyncio.sleep(0.1)
        assert refused
        assert proc.proc is not None and proc.proc.poll() is None
        assert "AUTH_SECRET_TIMEOUT" in proc.log()
    finally:
        proc.stop()


async def test_pairing_before_the_timeout_keeps_the_api(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "a", env={"AGENT_SECRET_TIMEOUT": "3s"}).start()
    try:
        assert (await _get(proc, "/_ping", proc.signer.headers()))[0] == 200
        await asyncio.sleep(4)
        assert (await _get(proc, "/ping"))[0] == 204
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("name", "value"),
    [("AGENT_PORT", "abc"), ("AGENT_PORT", "70000"), ("AGENT_SECRET_TIMEOUT", "3 days"), ("LOG_LEVEL", "LOUD"),
     ("AGENT_HOST", "not-an-ip"), ("DOCKER_HOST", "ftp://x"), ("EDGE", "maybe"),
     ("AGENT_CLUSTER_PROBE_TIMEOUT", "-1s"), ("MTLS_SSL_CERT", "/nonexistent.pem")],
)
def test_bad_configuration_stops_startup_naming_the_variable(name: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", name: value}
    if name == "MTLS_SSL_CERT":
        env["MTLS_SSL_KEY"] = "/nonexistent.key"
    res = subprocess.run([sys.executable, "-m", "agent"], cwd=REPO, env=env, capture_output=True, timeout=30)
    assert res.returncode == 2
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"CONFIG_INVALID {name}:"), lines
