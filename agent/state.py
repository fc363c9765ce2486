"""The running agent's shared state, built once at start and handed to the web application."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiodocker

from agent.auth import SignatureVerifier
from agent.cluster.membership import Member, Membership, StaticMembership
from agent.config import Config
from agent.connguard import ConnectionGuard
from agent.engine import EngineInfo
from agent.metrics import Metrics
from proxy.health import PeerHealth
from proxy.upstream import EngineUpstream, PeerPool


@dataclass
class AgentState:
    config: Config
    verifier: SignatureVerifier
    metrics: Metrics
    engine: EngineUpstream
    docker: aiodocker.Docker
    info: EngineInfo
    advertise_addr: str
    peers: PeerPool
    membership: Membership = field(default_factory=StaticMembership)
    guard: ConnectionGuard = field(default_factory=ConnectionGuard)
    """Limits on client connections before any signature (agent/connguard.py)."""
    engine_managers: frozenset[str] | None = None
    """Node IDs of the Swarm's managers as this node's engine knows them (`Swarm.RemoteManagers`)."""
    health: PeerHealth | None = None
    """Peers that failed recently: fan-outs and manager operations skip them until a probe answers."""
    self_member: Member = field(init=False)
    """This node as a member; built again whenever the engine's info changes (swarm_changed), the only place
    `info` is replaced."""

    def __post_init__(self) -> None:
        self.self_member = self._member()

    @property
    def clustered(self) -> bool:
        """Routing across nodes only happens when the engine is part of a Swarm."""
        return self.info.swarm

    def _member(self) -> Member:
        return Member(
            node_name=self.info.node_name,
            ip=self.advertise_addr,
            agent_port=self.config.agent_port,
            role=self.info.role,
            is_leader=self.info.leader,
            engine_status=self.info.engine_status,
        )

    def members(self) -> list[Member]:
        return self.membership.members()

    def swarm_changed(self, info: EngineInfo, managers: frozenset[str]) -> None:
        """The engine's current role, leader flag and manager set (agent/swarmwatch.py)."""
        self.info = info
        self.self_member = self._member()
        self.engine_managers = managers or None

    async def close(self) -> None:
        await self.membership.close()
        await self.peers.close()
        await self.engine.close()
        await self.docker.close()
