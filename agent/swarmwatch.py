"""Roles and leadership follow the Swarm at run time (the Go agent reads them once at start).

Every SWARM_CHECK_INTERVAL the agent asks its own engine `GET /info` (and, on a manager, its own node for
the leader flag): a promotion, a demotion or a leader change updates this node's Serf tags within seconds,
so every agent routes manager operations by what the Swarm is now. `/info` also names the managers the
engine itself knows (`Swarm.RemoteManagers`): routing takes only those as managers, so a stale tag of an
agent that has not noticed a demotion yet does not decide. A periodic look is used rather than engine
events because a worker's engine emits no node events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiodocker
import aiohttp

from agent.cluster.membership import Membership
from agent.cluster.serf import TAG_IS_LEADER, TAG_NODE_ROLE
from agent.engine import EngineInfo, read_engine_info

log = logging.getLogger(__name__)
SWARM_CHECK_INTERVAL = 2.0


def remote_managers(info: Mapping[str, Any]) -> frozenset[str]:
    """Node IDs of the managers the engine knows (`Swarm.RemoteManagers`), pure."""
    swarm = info.get("Swarm") or {}
    return frozenset(str(m.get("NodeID")) for m in swarm.get("RemoteManagers") or [] if m.get("NodeID"))


def role_tags(info: EngineInfo) -> dict[str, str]:
    """The Serf tags that carry a node's role (an empty value deletes the leader tag)."""
    return {TAG_NODE_ROLE: info.role, TAG_IS_LEADER: "1" if info.leader else ""}


class SwarmWatch:
    """Looks at the engine periodically; tells `on_change` and updates the tags when the role changed."""

    def __init__(self, docker: aiodocker.Docker, membership: Membership, current: EngineInfo,
                 on_change: Callable[[EngineInfo, frozenset[str]], None],
                 interval: float = SWARM_CHECK_INTERVAL) -> None:
        self.docker = docker
        self.membership = membership
        self.current = current
        self.on_change = on_change
        self.interval = interval

    async def look(self) -> None:
        raw = await self.docker.system.info()
        info = await read_engine_info(self.docker, raw)
        managers = remote_managers(raw)
        changed = (info.manager, info.leader) != (self.current.manager, self.current.leader)
        if changed:
            log.info("this node is now a %s%s (was a %s%s): updating its cluster tags", info.role,
                     " and the leader" if info.leader else "", self.current.role,
                     " and the leader" if self.current.leader else "")
            await self.membership.set_tags(role_tags(info))
        self.current = info
        self.on_change(info, managers)

    async def run(self) -> None:
        while True:
            try:
                await self.look()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("swarm look failed (kept the last view): %s", exc)
            await asyncio.sleep(self.interval)
