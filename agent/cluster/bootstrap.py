"""Start cluster membership for a Swarm node, as the Go agent does (docs/cluster.md).

Join AGENT_CLUSTER_ADDR, else `tasks.<service name>` from the agent container's Swarm labels (after a
3-second wait for Docker's DNS); every address a name resolves to is joined. A failed join or lookup leaves
a cluster of one that keeps re-resolving and re-joining while it is alone (Go stays alone, and exits on a
failed lookup, which a health-checked service hits on every fresh deploy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agent.cluster.serf import TAG_NODE_ID, TAG_STARTED, SerfMembership, resolve_join_addresses
from agent.config import Config
from agent.engine import EngineInfo
from agent.errors import Code, log_failure

log = logging.getLogger(__name__)
SERVICE_LABEL = "com.docker.swarm.service.name"


def cluster_join_name(config: Config, container: dict[str, Any] | None) -> tuple[str, bool]:
    """(name to resolve, whether it came from the service label) — pure."""
    if config.cluster_addr:
        return config.cluster_addr, False
    labels = ((container or {}).get("Config") or {}).get("Labels") or {}
    service = labels.get(SERVICE_LABEL, "")
    return (f"tasks.{service}", True) if service else ("", False)


def join_targets(addresses: list[str], serf_port: int, agent_port: int) -> list[str]:
    """`ip` -> `ip:serf_port`; a port equal to the agent's (`tasks.agent:9001`, as Go's docs show) means serf."""
    out = []
    for addr in addresses:
        host, sep, port = addr.rpartition(":")
        if sep and host and "]" not in port and port.isdigit() and int(port) != agent_port:
            out.append(addr)
        else:
            out.append(f"{host if sep and port.isdigit() else addr}:{serf_port}")
    return out


async def start_membership(config: Config, info: EngineInfo, advertise: str,
                           container: dict[str, Any] | None) -> SerfMembership:
    membership = SerfMembership(
        node_name=info.node_name,
        bind_ip="0.0.0.0",
        bind_port=config.serf_port,
        advertise_ip=advertise,
        agent_port=config.agent_port,
        role=info.role,
        is_leader=info.leader,
        engine_status=info.engine_status,
        data_dir=config.data_path / "serf",
        probe_timeout=config.cluster_probe_timeout,
        probe_interval=config.cluster_probe_interval,
        serf_binary=config.serf_binary,
        reconnect_timeout=config.serf_reconnect_timeout,
        extra_tags={TAG_NODE_ID: info.node_id, TAG_STARTED: str(time.time_ns())},
    )
    await membership.start()
    try:
        await _join(membership, config, info, container)
    except BaseException:
        await membership.close(leave=False)  # never leave a serf child behind a failed start
        raise
    return membership


async def _join(membership: SerfMembership, config: Config, info: EngineInfo,
                container: dict[str, Any] | None) -> None:
    name, from_label = cluster_join_name(config, container)
    if not name:
        log.info("no AGENT_CLUSTER_ADDR and no Swarm service label: starting a cluster of one")
        return
    if from_label:
        await asyncio.sleep(3)  # Docker's DNS may not know tasks.<service> yet (as the Go agent waits)
    async def resolve() -> list[str]:
        return join_targets(await resolve_join_addresses(name), config.serf_port, config.agent_port)

    try:
        targets = await resolve()
    except OSError as exc:
        # Not fatal (Go exits here): Swarm lists a task in tasks.<service> only once its health check
        # passes, and that needs this agent serving. Keep going alone; keep_joining retries the lookup.
        log_failure(Code.CLUSTER_JOIN_FAILED, "cluster address does not resolve yet: retrying in the background",
                    name=name, error=exc)
        targets = []
    joined = await membership.join(targets) if targets else 0
    others = [m for m in membership.members() if m.node_name != info.node_name]
    if not others:
        log_failure(Code.CLUSTER_JOIN_FAILED, "no other member yet: retrying in the background", targets=targets)
    else:
        log.info("joined %d of %d cluster addresses (%s)", joined, len(targets), name)
    membership.keep_joining(resolve)
