"""Gigabytes through the agent with flat memory (streamed, never buffered), and mutual TLS on the API."""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import threading
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tools.agentproc import AgentProcess
from tools.dockerd import DOCKER_CLI, PrivateDockerd

SIZE_MB = 1024


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_gigabyte_streams_both_ways_with_flat_memory(agent: AgentProcess) -> None:
    assert agent.proc is not None
    pid = agent.proc.pid
    peak = [_rss_kb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak.append(_rss_kb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    env = {"DOCKER_CERT_PATH": str(agent.config_dir), "PATH": os.environ["PATH"]}
    base = [DOCKER_CLI, "--config", str(agent.config_dir), "--tls", "-H", f"tcp://127.0.0.1:{agent.port}"]
    try:
        # down: 1 GiB of container output through the hijacked attach stream
        down = subprocess.run([*base, "run", "--rm", "busybox:local", "dd", "if=/dev/zero", "bs=1M",
                               f"count={SIZE_MB}"], env=env, capture_output=True, timeout=600, check=True)
        assert len(down.stdout) == SIZE_MB * 2**20
        # up: 1 GiB of stdin through `run -i`, counted inside the container
        with subprocess.Popen([*base, "run", "-i", "--rm", "busybox:local", "wc", "-c"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            chunk = b"\0" * 2**20
            for _ in range(SIZE_MB):
                proc.stdin.write(chunk)
            proc.stdin.close()
            counted = proc.stdout.read().decode().strip()
        assert counted == str(SIZE_MB * 2**20)
    finally:
        stop.set()
        sampler.join()
    growth_mb = (max(peak) - peak[0]) / 1024
    assert growth_mb < 64, f"agent RSS grew by {growth_mb:.0f} MB while 2 GiB went through"


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None = None,
          issuer: x509.Certificate | None = None, ca: bool = False,
          san_ip: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
                                        critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


async def test_mutual_tls_on_the_api(engine: PrivateDockerd, tmp_path: Path) -> None:
    ca, ca_key = _cert("test CA", ca=True)
    server, server_key = _cert("agent", ca_key, ca, san_ip="127.0.0.1")
    client, client_key = _cert("portainer", ca_key, ca)
    stranger_ca, stranger_key = _cert("other CA", ca=True)
    stranger, stranger_client_key = _cert("intruder", stranger_key, stranger_ca)
    for name, cert, key in (("ca", ca, None), ("server", server, server_key), ("client", client, client_key),
                            ("stranger", stranger, stranger_client_key)):
        _write(tmp_path / f"{name}.pem", cert, key)
    proc = AgentProcess(engine.host, tmp_path / "agent", env={
        "MTLS_SSL_CERT": str(tmp_path / "server.pem"), "MTLS_SSL_KEY": str(tmp_path / "server.key"),
        "MTLS_SSL_CA": str(tmp_path / "ca.pem")})
    proc.start(wait=False)
    try:
        def ctx(with_cert: str | None) -> ssl.SSLContext:
            c = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            if with_cert:
                c.load_cert_chain(str(tmp_path / f"{with_cert}.pem"), str(tmp_path / f"{with_cert}.key"))
            return c

        import asyncio

        async with aiohttp.ClientSession() as s:
            for _ in range(100):  # bounded wait for the listener
                try:
                    async with s.get(proc.url + "/ping", ssl=ctx("client")) as r:
                        assert r.status == 204
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.2)
            else:
                pytest.fail(f"agent with mTLS never answered: {proc.log()}")
            # the served certificate is the operator's (verification against the CA succeeded above)
            for bad in (None, "stranger"):
                with pytest.raises(aiohttp.ClientError):
                    async with s.get(proc.url + "/ping", ssl=ctx(bad)) as r:
                        await r.read()
    finally:
        proc.stop()
