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

    @property
    def clustered(self) -> bool:
        """Routing across nodes only happens when the engine is part of a Swarm."""
        return self.info.swarm

    @property
    def self_member(self) -> Member:
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

    async def close(self) -> None:
        await self.membership.close()
        await self.peers.close()
        await self.engine.close()
        await self.docker.close()
