"""Portainer client and poll loop in-process against the stand-in: ETags, global key, bad answers, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.client import ETAG_CACHE_SIZE, PollError, PollResponse, PortainerClient, TlsFiles, parse_poll_response
from edge.poller import Poller, backoff_delay
from tests.edge.portainer_standin import PortainerStandin

pytestmark = pytest.mark.edge

EDGE_ID = "edge-poller-1"


@pytest.fixture
async def portainer() -> AsyncIterator[PortainerStandin]:
    server = PortainerStandin(None, checkin=7)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_etag_cache_reuses_bodies_and_keeps_eight(portainer: PortainerStandin) -> None:
    portainer.add_endpoint(2, checked_in=True)
    client = PortainerClient(portainer.url, EDGE_ID, 2)
    try:
        first = await client.status()
        assert first.status == "IDLE" and first.checkin == 7
        again = await client.status()
        assert again is first  # 304: the cached body
        assert [p.status for p in portainer.polls_for(2)] == [200, 304]
        for n in range(ETAG_CACHE_SIZE + 2):  # every new body has a new ETag
            portainer.checkin = 10 + n
            portainer.cache.clear()
            assert (await client.status()).checkin == 10 + n
        sent = client.status_headers()["If-None-Match"].split(",")
        assert len(sent) == ETAG_CACHE_SIZE and sent[-1] == portainer.cache[2]
    finally:
        await client.close()


async def test_poller_resolves_a_global_key_and_follows_checkin(portainer: PortainerStandin) -> None:
    portainer.add_endpoint(4, edge_id=EDGE_ID, checked_in=True)
    seen: list[PollResponse] = []

    async def on_status(response: PollResponse) -> None:
        seen.append(response)

    client = PortainerClient(portainer.url, EDGE_ID, 0)
    poller = Poller(client, on_status, global_key=True, interval=5.0)
    try:
        assert await poller._cycle() == 7.0  # the server's checkin becomes the interval
        assert client.endpoint_id == 4 and client.timeout == 7.0
        assert len(portainer.global_key_requests) == 1 and portainer.global_key_bodies == [b"{}"]
        assert portainer.polls_for(4)[0].status == 200 and seen[0].status == "IDLE"
        # A non-OK answer makes a global key ask for its endpoint id again (Go: SetEndpointID(0)).
        portainer.endpoints[4].edge_id = "another-agent"
        portainer.cache.clear()
        await poller._cycle()
        assert client.endpoint_id == 0 and poller.failures == 1
    finally:
        await client.close()


async def test_bad_answers_are_logged_and_never_stop_polling(caplog: pytest.LogCaptureFixture) -> None:
    answers = [
        web.Response(status=500, text="boom"),
        web.Response(status=200, text="<html>"),
        web.json_response({"status": "SLEEPY"}),
        web.Response(status=304, headers={"ETag": "cafe"}),
        web.json_response({"status": "IDLE", "port": "x"}),
        web.json_response({"status": "REQUIRED", "port": 50000, "credentials": "abc", "checkin": 2,
                           "schedules": [{"Id": 1, "CronExpression": "* * * * *", "Script": "ZWNobw",
                                          "Version": 1}, "junk"], "stacks": None}),
    ]

    async def status(_request: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/api/endpoints/1/edge/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    seen: list[PollResponse] = []

    async def on_status(response: PollResponse) -> None:
        seen.append(response)

    client = PortainerClient(url, EDGE_ID, 1)
    poller = Poller(client, on_status, global_key=False, interval=1.0, max_backoff=4.0)
    caplog.set_level(logging.INFO)
    try:
        delays = [await poller._cycle() for _ in range(5)]
        assert poller.failures == 5 and not seen
        assert all(0 < d <= 6.0 for d in delays)
        failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EDGE_POLL_FAILED")]
        assert len(failures) == 5  # one line per bad answer
        assert "HTTP 500: boom" in failures[0] and "not JSON" in failures[1]
        assert "unknown status 'SLEEPY'" in failures[2] and "unknown ETag" in failures[3]
        assert "port is not an integer" in failures[4]
        assert await poller._cycle() == 2.0
        assert poller.failures == 0 and seen[0].status == "REQUIRED" and len(seen[0].schedules) == 1
        assert any("malformed schedule" in r.getMessage() for r in caplog.records)
    finally:
        await client.close()
        await runner.cleanup()


def test_parse_and_backoff() -> None:
    parsed = parse_poll_response(b'{"status":"IDLE","port":0,"schedules":null,"checkin":5,"credentials":"",'
                                 b'"stacks":null}')
    assert parsed == PollResponse("IDLE", 0, (), 5.0, "", None)
    with pytest.raises(PollError):
        parse_poll_response(b"[]")
    assert backoff_delay(5, 1, 60, lambda: 0.5) == 5.0
    assert backoff_delay(5, 3, 60, lambda: 0.5) == 20.0
    assert backoff_delay(5, 30, 60, lambda: 0.0) == 30.0  # capped, then jittered (0.5..1.5)
    assert backoff_delay(5, 30, 60, lambda: 0.999) < 90.0


# --- TLS: EDGE_INSECURE_POLL and MTLS_SSL_CERT/KEY/CA --------------------------------------------------------


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          ca: bool = False, server: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
            "127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, ca=True)
    ca_name = ca.subject
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files: dict[str, str] = {}
    files["ca"], _ = _write(tmp_path / "ca", ca, ca_key)
    files["server_cert"], files["server_key"] = _write(
        tmp_path / "server", _cert("portainer", server_key, (ca_name, ca_key), server=True), server_key)
    files["client_cert"], files["client_key"] = _write(
        tmp_path / "client", _cert("edge-agent", client_key, (ca_name, ca_key)), client_key)
    return files


async def _poll(url: str, tls: TlsFiles) -> str:
    client = PortainerClient(url, EDGE_ID, 3, tls=tls)
    try:
        return (await client.status()).status
    finally:
        await client.close()


async def test_mtls_client_identity_and_ca(pki: dict[str, str]) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
    server_ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # Portainer started with --sslcacert: client certificates required
    portainer = PortainerStandin(None)
    portainer.add_endpoint(3, checked_in=True)
    await portainer.start(ssl_context=server_ctx)
    try:
        assert portainer.url.startswith("https://")
        assert await _poll(portainer.url, TlsFiles(pki["client_cert"], pki["client_key"], pki["ca"])) == "IDLE"
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await _poll(portainer.url, TlsFiles(ca=pki["ca"]))  # no client identity: handshake refused
        with pytest.raises(aiohttp.ClientError):
            await _poll(portainer.url, TlsFiles(pki["client_cert"], pki["client_key"]))  # system CAs: untrusted
    finally:
        await portainer.stop()


async def test_insecure_poll_accepts_a_self_signed_server(pki: dict[str, str]) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    portainer = PortainerStandin(None)
    portainer.add_endpoint(3, checked_in=True)
    await portainer.start(ssl_context=server_ctx)
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _poll(portainer.url, TlsFiles())
        assert await _poll(portainer.url, TlsFiles(insecure=True)) == "IDLE"
    finally:
        await portainer.stop()


async def test_global_key_request_carries_the_onboarding_fields_as_go(portainer: PortainerStandin) -> None:
    portainer.add_endpoint(5, edge_id=EDGE_ID, checked_in=True)
    client = PortainerClient(portainer.url, EDGE_ID, 0, edge_groups=(1, 4), tags=(), environment_group=2)
    try:
        assert await client.global_key() == 5
        assert json.loads(portainer.global_key_bodies[-1]) == {
            "edgeGroupsIds": [1, 4], "tagsIds": None, "environmentGroupId": 2}
    finally:
        await client.close()
