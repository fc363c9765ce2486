"""What the agent needs to know about its own engine: node name, Swarm state and role."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp

from agent.config import DockerEndpoint
from agent.tls import docker_client_context


@dataclass(frozen=True)
class EngineInfo:
    """The parts of `docker info` that decide routing (docs/cluster.md)."""

    node_name: str
    node_id: str = ""
    swarm: bool = False
    manager: bool = False
    leader: bool = False
    server_version: str = ""

    @property
    def role(self) -> str:
        return "manager" if self.manager else "worker"

    @property
    def engine_status(self) -> str:
        return "swarm" if self.swarm else "standalone"


def docker_client(endpoint: DockerEndpoint) -> aiodocker.Docker:
    """aiodocker for the agent's own calls, on the engine DOCKER_HOST names."""
    if endpoint.is_unix:
        return aiodocker.Docker(url=endpoint.url)
    ssl_ctx = None
    if endpoint.uses_tls and endpoint.cert_path is not None:
        ssl_ctx = docker_client_context(endpoint.cert_path, endpoint.tls_verify)
    connector = aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx is not None else None
    return aiodocker.Docker(url=endpoint.http_base, connector=connector, ssl_context=ssl_ctx)


def parse_info(info: Mapping[str, Any], nodes: list[dict[str, Any]] | None = None) -> EngineInfo:
    """Build EngineInfo from `GET /info` (and, on a manager, this node's `GET /nodes/{id}`)."""
    swarm = info.get("Swarm") or {}
    node_id = swarm.get("NodeID") or ""
    manager = bool(swarm.get("ControlAvailable"))
    leader = False
    for node in nodes or []:
        if node.get("ID") == node_id:
            leader = bool((node.get("ManagerStatus") or {}).get("Leader"))
    return EngineInfo(
        node_name=info.get("Name") or socket.gethostname(),
        node_id=node_id,
        swarm=bool(node_id) and swarm.get("LocalNodeState") == "active",
        manager=manager,
        leader=leader,
        server_version=info.get("ServerVersion", ""),
    )


async def read_engine_info(docker: aiodocker.Docker, info: Mapping[str, Any]) -> EngineInfo:
    """EngineInfo from `GET /info` (already read by the caller); a manager also asks for its own node."""
    nodes: list[dict[str, Any]] = []
    swarm = info.get("Swarm") or {}
    if swarm.get("ControlAvailable") and swarm.get("NodeID"):
        node = await docker._query_json(f"nodes/{swarm['NodeID']}")
        nodes = [node]
    return parse_info(info, nodes)


def pick_container_address(container: dict[str, Any], networks_info: dict[str, dict[str, Any]],
                           swarm: bool) -> str:
    """The Go agent's advertise address: first attached network that is not the ingress network (known by
    its `Ingress` flag, whatever it is called), and of swarm scope in a Swarm."""
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    scopes = {name: str(info.get("Scope", "")) for name, info in networks_info.items()}
    for name, net in networks.items():
        if (networks_info.get(name) or {}).get("Ingress") or (name == "ingress" and name not in networks_info):
            continue
        if swarm and scopes.get(name, "swarm") != "swarm":
            continue
        ip = net.get("IPAddress") or ""
        if ip:
            return str(ip)
    return ""


async def own_container(docker: aiodocker.Docker) -> dict[str, Any] | None:
    """The agent's own container on this engine (found by hostname), or None when it is not one."""
    try:
        container = await docker._query_json(f"containers/{socket.gethostname()}/json")
    except aiodocker.DockerError:
        return None
    return container if isinstance(container, dict) else None


async def find_advertise_addr(docker: aiodocker.Docker, info: Mapping[str, Any], agent_host: str,
                              container: dict[str, Any] | None) -> str:
    """Container network (as the Go agent), else the Swarm node address, else AGENT_HOST, else loopback."""
    swarm = bool((info.get("Swarm") or {}).get("NodeID"))
    if container is not None:
        infos: dict[str, dict[str, Any]] = {}
        for name in ((container.get("NetworkSettings") or {}).get("Networks") or {}):
            try:
                net = await docker._query_json(f"networks/{name}")
            except aiodocker.DockerError:
                continue
            if isinstance(net, dict):
                infos[name] = net
        addr = pick_container_address(container, infos, swarm)
        if addr:
            return addr
    node_addr = (info.get("Swarm") or {}).get("NodeAddr") or ""
    if node_addr:
        return str(node_addr)
    if agent_host not in ("0.0.0.0", "::"):
        return agent_host
    return "127.0.0.1"
