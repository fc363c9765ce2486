"""The benchmarks' floor references (bench/relay.py) in front of the session's dockerd: what the relay relays
is the engine's own answer, several requests go over one kept-alive connection, and stopping it stops every
process it forked; with --checks, only a signed request reaches the engine and its answers carry the agent's
headers."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bench.external import AsyncioRelay, CheckedRelay
from tools.dockerd import PrivateDockerd
from tools.procs import alive, descendants
from tools.signer import Signer


@pytest.mark.timeout(120)
def test_the_relay_pipes_engine_answers_on_a_kept_alive_connection(engine: PrivateDockerd, tmp_path: Path) -> None:
    import http.client

    relay = AsyncioRelay(tmp_path / "relay", str(engine.socket), workers=2).start()
    try:
        children = descendants(relay.pid)
        assert len(children) == 1  # two processes on the port: the parent and one fork
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", relay.port, timeout=30, context=ctx)
        first_socket = None
        for path in ("/_ping", "/containers/json?all=1", "/version"):
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (path, body[:200])
            first_socket = first_socket or conn.sock
            assert conn.sock is first_socket  # the same kept-alive connection
            if path == "/_ping":
                assert body == b"OK"
            elif path == "/version":
                assert b'"ApiVersion"' in body
            else:
                assert body.startswith(b"[")
        conn.close()
    finally:
        relay.stop()
    assert not alive(relay.pid)
    assert not any(alive(pid) for pid in children)


@pytest.mark.timeout(120)
def test_the_docker_cli_reaches_the_engine_through_the_relay(engine: PrivateDockerd, tmp_path: Path) -> None:
    """The streaming scenario drives the references with the Docker CLI: their `cli_args()` must be enough."""
    import os
    import subprocess

    from tools.dockerd import DOCKER_CLI

    relay = AsyncioRelay(tmp_path / "relay", str(engine.socket), workers=1).start()
    try:
        args, env = relay.cli_args()
        res = subprocess.run([DOCKER_CLI, *args, "version", "--format", "{{.Server.Version}}"],
                             env={**{k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}, **env},
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        direct = subprocess.run([DOCKER_CLI, "-H", engine.host, "version", "--format", "{{.Server.Version}}"],
                                capture_output=True, text=True, timeout=60, check=True)
        assert res.stdout.strip() == direct.stdout.strip() != ""
    finally:
        relay.stop()


@pytest.mark.timeout(120)
def test_the_checked_relay_serves_signed_requests_only_with_the_agent_headers(engine: PrivateDockerd,
                                                                               tmp_path: Path) -> None:
    import http.client
    import json

    relay = CheckedRelay(tmp_path / "checked", str(engine.socket), workers=1).start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    portainer, intruder = Signer(), Signer()
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", relay.port, timeout=30, context=ctx)
        first_socket = None
        for path in ("/_ping", "/v1.41/containers/json?all=1", "/version", "/containers/json?all=1"):
            conn.request("GET", path, headers=portainer.headers())
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (path, body[:200])
            assert response.getheader("Portainer-Agent") and response.getheader("Portainer-Agent-Platform") == "1"
            first_socket = first_socket or conn.sock
            assert conn.sock is first_socket  # the same kept-alive connection
            if path == "/_ping":
                assert body == b"OK"
            elif path == "/version":
                assert "ApiVersion" in json.loads(body)
            else:
                assert isinstance(json.loads(body), list)
        conn.close()
        for headers in ({}, intruder.headers()):  # unsigned; signed by a key other than the pinned one
            conn = http.client.HTTPSConnection("127.0.0.1", relay.port, timeout=30, context=ctx)
            conn.request("GET", "/_ping", headers=headers)
            response = conn.getresponse()
            assert response.status == 403
            assert "message" in json.loads(response.read())
            conn.close()
        import socket

        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", relay.port), timeout=30)) as raw:
            raw.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nno colon in this line\r\n\r\n")
            answer = b""
            while chunk := raw.recv(65536):  # the relay closes after a refusal
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
        assert "message" in json.loads(answer.split(b"\r\n\r\n", 1)[1])
    finally:
        relay.stop()
    assert not alive(relay.pid)
