"""The membership interface: routing and fan-out only ever see this, never Serf itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

ROLE_MANAGER = "manager"
ROLE_WORKER = "worker"


@dataclass(frozen=True)
class Member:
    """One agent of the cluster as the others see it (Serf tags, see docs/cluster.md)."""

    node_name: str
    ip: str
    agent_port: int
    role: str = ROLE_WORKER
    is_leader: bool = False
    edge_key_set: bool = False
    engine_status: str = "swarm"
    node_id: str = ""
    """The Swarm node ID (a Keelson tag; empty for a Go agent)."""
    started: int = 0
    """When this agent started (ns since the epoch, a Keelson tag): of two members of one node, the newest
    is the live one (a restarted agent's dead twin lingers in Serf until it is reaped)."""

    @property
    def is_manager(self) -> bool:
        return self.role == ROLE_MANAGER

    def to_api(self) -> dict[str, object]:
        """The Go agent's `/agents` item shape."""
        return {
            "IPAddress": self.ip,
            "Port": str(self.agent_port),
            "NodeName": self.node_name,
            "NodeRole": self.role,
            "EdgeKeySet": self.edge_key_set,
        }


MembersListener = Callable[[list[Member]], None]


class Membership(Protocol):
    """What the rest of the agent needs from a cluster: the live members and change events."""

    def members(self) -> list[Member]:
        """Alive members, this node included, first match by NodeName wins."""
        ...

    def subscribe(self, listener: MembersListener) -> None:
        """Call ``listener`` with the new member list whenever it changes."""
        ...

    async def set_tags(self, tags: dict[str, str]) -> None:
        """Update this node's advertised data (for example EdgeKeySet)."""
        ...

    async def close(self) -> None: ...


@dataclass
class StaticMembership:
    """A fixed member list: the standalone engine (one member) and pure routing/fan-out tests."""

    items: list[Member] = field(default_factory=list)
    _listeners: list[MembersListener] = field(default_factory=list)

    def members(self) -> list[Member]:
        return list(self.items)

    def subscribe(self, listener: MembersListener) -> None:
        self._listeners.append(listener)

    def replace(self, items: list[Member]) -> None:
        self.items = list(items)
        for listener in self._listeners:
            listener(self.members())

    async def set_tags(self, tags: dict[str, str]) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        await asyncio.sleep(0)


def find_member(members: list[Member], node_name: str) -> Member | None:
    """First member whose NodeName matches, as the Go agent does."""
    for member in members:
        if member.node_name == node_name:
            return member
    return None
