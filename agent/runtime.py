"""Start-up and shut-down of one agent: engine, membership, TLS listener, security shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiodocker
from aiohttp import web

from agent.auth import SignatureVerifier
from agent.cluster.membership import StaticMembership
from agent.config import Config
from agent.engine import docker_client, find_advertise_addr, parse_info, read_engine_info
from agent.errors import Code, log_failure
from agent.metrics import Metrics
from agent.server import build_app
from agent.state import AgentState
from agent.tls import peer_client_context, server_context
from agent.tlsproto import server_protocol_factory
from proxy.upstream import EngineUpstream, PeerPool

log = logging.getLogger("keelson")


async def build_state(config: Config) -> AgentState:
    docker = docker_client(config.docker)
    try:
        raw_info = await docker.system.info()
        info = await read_engine_info(docker)
    except (TimeoutError, aiodocker.DockerError, OSError) as exc:
        await docker.close()
        raise RuntimeError(f"{Code.PROXY_DOCKER_UNREACHABLE.value} cannot reach the Docker engine at "
                           f"{config.docker.url}: {exc}") from exc
    if not info.node_name:
        info = parse_info(raw_info)
    advertise = config.advertise_addr or await find_advertise_addr(docker, raw_info, config.agent_host)
    state = AgentState(
        config=config,
        verifier=SignatureVerifier(config.secret),
        metrics=Metrics(),
        engine=EngineUpstream(config.docker),
        docker=docker,
        info=info,
        advertise_addr=advertise,
        peers=PeerPool(tls=not config.edge, client_context=peer_client_context(config)),
    )
    state.membership = StaticMembership([state.self_member])
    verifier = state.verifier
    state.metrics.signature_verifications.set_function(lambda: verifier.verifications)
    return state


async def _security_shutdown(state: AgentState, server: asyncio.AbstractServer, runner: web.AppRunner) -> None:
    """Not paired and no secret after AGENT_SECRET_TIMEOUT: close the API, keep the process (as Go)."""
    try:
        await asyncio.wait_for(state.verifier.wait_paired(), state.config.secret_timeout)
    except TimeoutError:
        log_failure(Code.AUTH_SECRET_TIMEOUT, "no Portainer instance paired with this agent in time: "
                    "the API server is shut down (restart the agent to pair again)",
                    timeout_seconds=state.config.secret_timeout)
        server.close()
        await runner.shutdown()


async def run(config: Config, stop: asyncio.Event) -> int:
    try:
        state = await build_state(config)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    loop = asyncio.get_running_loop()
    ctx = server_context(config, [state.advertise_addr, "127.0.0.1"])
    assert runner.server is not None
    server = await loop.create_server(
        server_protocol_factory(loop, runner.server, ctx), config.agent_host, config.agent_port,
        reuse_address=True, backlog=1024,
    )
    log.info("agent listening on https://%s:%d (node %s, %s, advertise %s, engine %s)", config.agent_host,
             config.agent_port, state.info.node_name, state.info.engine_status, state.advertise_addr,
             config.docker.url)
    guard = None
    if not config.secret and not config.edge:
        guard = asyncio.create_task(_security_shutdown(state, server, runner))
    try:
        await stop.wait()
    finally:
        log.info("agent stopping")
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        server.close()
        await runner.cleanup()
        await state.close()
    return 0
