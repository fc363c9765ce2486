"""Typed keys for what the aiohttp application shares between handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiodocker
    from proxy.engine_client import EngineClient

    from agent.cluster.membership import Membership
    from agent.config import Config
    from agent.engine import EngineInfo
    from agent.metrics import Metrics

CONFIG: web.AppKey[Config] = web.AppKey("config")
DOCKER: web.AppKey[aiodocker.Docker] = web.AppKey("docker")
"""aiodocker client for the agent's own calls (info, volume inspect)."""
ENGINE: web.AppKey[EngineClient] = web.AppKey("engine")
"""Raw streaming access to the local engine for the proxy (see proxy/engine_client.py)."""
ENGINE_INFO: web.AppKey[EngineInfo] = web.AppKey("engine_info")
MEMBERSHIP: web.AppKey[Membership] = web.AppKey("membership")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")

if TYPE_CHECKING:
    from agent.state import AgentState

STATE: web.AppKey[AgentState] = web.AppKey("state")
"""Everything the handlers share: config, verifier, metrics, engine, membership, peers."""
