"""The deployment files themselves (no root, no engine): stack file, build context, mirror lookup, health check."""

from __future__ import annotations

import http.server
import importlib.util
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from agent.tls import self_signed_pem
from tools.deploy import node_paths
from tools.image import CONTEXT_PATHS, REPO_ROOT, build_tag_for, debian_mirror, dependencies
from tools.swarm import SwarmCluster, SwarmNode


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keelson_healthcheck", REPO_ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_healthcheck()


def test_stack_file_is_the_go_agents_documented_shape() -> None:
    stack = yaml.safe_load((REPO_ROOT / "docker-compose.swarm.yml").read_text())
    agent = stack["services"]["agent"]
    assert agent["image"] == "${KEELSON_IMAGE:-keelson/agent:latest}"
    assert agent["deploy"]["mode"] == "global"
    assert agent["environment"]["AGENT_CLUSTER_ADDR"] == "tasks.agent"
    mounts = {m["target"]: m["source"] for m in agent["volumes"]}
    assert mounts["/var/run/docker.sock"] == "${KEELSON_DOCKER_SOCKET:-/var/run/docker.sock}"
    volumes = "${KEELSON_DOCKER_VOLUMES:-/var/lib/docker/volumes}"
    assert mounts[volumes] == volumes
    assert agent["ports"] == [{"target": 9001, "published": 9001, "protocol": "tcp", "mode": "host"}]
    assert agent["networks"] == ["agent_network"]
    assert stack["networks"]["agent_network"]["driver"] == "overlay"
    # Host-mode port: two tasks of one node cannot both hold it, so an update must stop the old one first.
    assert agent["deploy"]["update_config"]["order"] == "stop-first"


def test_dockerignore_allows_exactly_the_context_the_image_key_hashes() -> None:
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert sorted(rule[1:] for rule in rules if rule.startswith("!")) == sorted(CONTEXT_PATHS)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert any(src.rstrip("/") == p or src.startswith(p + "/") for p in CONTEXT_PATHS), src


def test_dockerfile_builds_on_a_base_argument_and_runs_the_agent() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in text
    assert text.count("FROM ${BASE}") == 2
    assert 'ENTRYPOINT ["/opt/keelson/bin/python", "-m", "agent"]' in text
    assert "HEALTHCHECK" in text and "healthcheck.py" in text


def test_debian_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list").write_text("deb http://one.example/debian trixie main\n")
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(RuntimeError, match="no Debian mirror for bookworm"):
        debian_mirror(tmp_path)


def test_wheelhouse_requirements_cover_the_build_backend() -> None:
    reqs = dependencies()
    assert any(r.startswith("aiohttp") for r in reqs)
    assert any(r.startswith("setuptools") for r in reqs)  # pip builds /src offline in the image


def test_build_tag_keeps_the_repository() -> None:
    assert build_tag_for("keelson/agent:latest", "abc") == "keelson/agent:abc"
    assert build_tag_for("localhost:5000/keelson/agent", "abc") == "localhost:5000/keelson/agent:abc"


def test_node_paths_template_the_node_folders(tmp_path: Path) -> None:
    cluster = SwarmCluster(tmp_path, nodes=2, run_id="abcdef")
    cluster.nodes = [SwarmNode(index=i, name=f"node{i}", ip=f"10.9.9.{i}", netns=f"n{i}", veth=f"v{i}",
                               dir=tmp_path / f"node{i}", bip=f"172.30.{i}.1/24") for i in (1, 2)]
    sock, volumes = node_paths(cluster)
    assert sock == f"{tmp_path}/{{{{.Node.Hostname}}}}/dockerd/docker.sock"
    assert volumes == f"{tmp_path}/{{{{.Node.Hostname}}}}/dockerd/data/volumes"


# ---------------------------------------------------------------------- the image's health check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ping_server(tmp_path: Path) -> Iterator[tuple[int, list[int]]]:
    """A TLS server on 127.0.0.1 whose `GET /ping` answers the status at the head of the returned list."""
    statuses = [204]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[0] if self.path == "/ping" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    cert, key = self_signed_pem(["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), statuses
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_wants_204_from_ping(ping_server: tuple[int, list[int]]) -> None:
    port, statuses = ping_server
    healthy, why = healthcheck.check({"AGENT_PORT": str(port)})
    assert healthy, why
    statuses[0] = 500
    healthy, why = healthcheck.check({"AGENT_PORT": str(port)})
    assert not healthy and "500" in why


def test_healthcheck_nothing_listening_is_unhealthy_unless_closed_on_purpose() -> None:
    env = {"AGENT_PORT": str(free_port()), "AGENT_SECRET_TIMEOUT": "1h"}
    healthy, why = healthcheck.check(env, uptime=60)
    assert not healthy and "nothing listens" in why
    # Nobody paired within AGENT_SECRET_TIMEOUT: the agent closed its API and must not be replaced for it.
    healthy, why = healthcheck.check(env, uptime=3601)
    assert healthy and "on purpose" in why
    # With a secret there is no such shutdown: a closed API is a fault.
    healthy, _ = healthcheck.check({**env, "AGENT_SECRET": "s"}, uptime=3601)
    assert not healthy


def test_healthcheck_reports_a_bad_configuration() -> None:
    healthy, why = healthcheck.check({"AGENT_PORT": "none"})
    assert not healthy and "AGENT_PORT" in why


def test_healthcheck_probes_agent_host_when_it_is_not_a_wildcard() -> None:
    assert healthcheck.probe_target("0.0.0.0", edge=False) == "127.0.0.1"
    assert healthcheck.probe_target("10.1.2.3", edge=False) == "10.1.2.3"
