"""Start-up and shut-down of one agent: engine, membership, TLS listener, security shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from functools import partial
from typing import Any

import aiodocker
import aiohttp
from aiohttp import web

from agent.api.key import EDGE_KEY_HANDLER
from agent.auth import SignatureVerifier
from agent.cluster.bootstrap import start_membership
from agent.cluster.membership import Member, StaticMembership
from agent.cluster.serf import SerfError
from agent.config import Config
from agent.connguard import ConnectionGuard
from agent.engine import docker_client, find_advertise_addr, own_container, read_engine_info
from agent.errors import Code, log_failure
from agent.front import LeanFront
from agent.metrics import Metrics
from agent.server import build_app
from agent.state import AgentState
from agent.swarmwatch import SwarmWatch, remote_managers
from agent.tasks import spawn, supervise
from agent.tls import peer_client_context, server_context
from agent.tlsproto import server_protocol_factory
from agent.workers import VIEW_WAIT, WorkerSlot, follow_view, publish_view
from proxy.health import PeerHealth
from proxy.upstream import EngineUpstream, PeerPool

log = logging.getLogger(__name__)
SHUTDOWN_GRACE = 0.5
HEAD_BUDGET = 64 * 2**20
"""Bytes all unfinished request heads may hold together (agent/connguard.py)."""


async def build_state(config: Config, slot: WorkerSlot | None = None) -> AgentState:
    """The state of this process; with worker slots only the primary starts Serf (the others follow its
    view, agent/workers.py) and the pinned key is shared."""
    shared = slot is not None and slot.count > 1
    docker = docker_client(config.docker)
    try:
        raw_info = await docker.system.info()
        info = await read_engine_info(docker, raw_info)
    except (TimeoutError, aiodocker.DockerError, OSError) as exc:
        await docker.close()
        raise RuntimeError(f"{Code.PROXY_DOCKER_UNREACHABLE.value} cannot reach the Docker engine at "
                           f"{config.docker.url}: {exc}") from exc
    container = await own_container(docker)
    advertise = config.advertise_addr or await find_advertise_addr(docker, raw_info, config.agent_host, container)
    state = AgentState(
        config=config,
        verifier=SignatureVerifier(config.secret, pin=slot.pin if slot is not None and shared else None),
        metrics=Metrics(),
        engine=EngineUpstream(config.docker),
        docker=docker,
        info=info,
        advertise_addr=advertise,
        peers=PeerPool(tls=not config.edge, client_context=peer_client_context(config),
                       connect_timeout=config.peer_connect_timeout),
        engine_managers=remote_managers(raw_info) or None,
    )
    state.health = health = PeerHealth(partial(_probe_peer, state.peers))
    # The limits hold for the agent as a whole: each of N workers takes its share.
    workers = slot.count if slot is not None and shared else 1
    state.guard = ConnectionGuard(head_timeout=config.header_timeout, head_budget=HEAD_BUDGET // workers,
                                  max_unproven=max(1, -(-config.max_unproven // workers)),
                                  on_close=partial(_connection_closed, state.metrics))
    try:
        await state.engine.read_api_range()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        log.warning("%s cannot read the engine's API versions yet (requests go at the caller's version): %s",
                    Code.PROXY_DOCKER_UNREACHABLE.value, exc)
    if info.swarm and shared and slot is not None and not slot.primary:
        state.membership = StaticMembership([state.self_member])  # until the primary's view arrives
    elif info.swarm:
        try:
            state.membership = await start_membership(config, info, advertise, container)
        except (RuntimeError, SerfError, OSError) as exc:
            await state.close()
            raise RuntimeError(f"{Code.CLUSTER_SERF_FAILED.value} {exc}") from exc
    else:
        state.membership = StaticMembership([state.self_member])
    metrics = state.metrics
    membership = state.membership
    metrics.cluster_members.set(len(membership.members()))
    known = {m.node_name for m in membership.members()}

    def members_changed(members: list[Member]) -> None:
        nonlocal known
        now = {m.node_name for m in members}
        health.members_changed(known, now)
        known = now
        metrics.cluster_members.set(len(members))

    membership.subscribe(members_changed)
    state.verifier.on_verification = state.metrics.signature_verifications.inc
    return state


async def _probe_peer(peers: PeerPool, ip: str, port: int) -> bool:
    """A cheap look whether a peer's agent is back: `GET /ping` (unsigned) answers 204 within a second."""
    upstream = peers.upstream(ip, port)
    try:
        async with upstream.session.get(upstream.base_url + "/ping", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
            return r.status == 204
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


_LIMIT_CODES = {
    "head_timeout": (Code.LIMIT_HEAD_TIMEOUT, "a client did not finish its request head in time"),
    "head_too_large": (Code.LIMIT_HEAD_TOO_LARGE, "a client's request head passed 1 MiB (431)"),
    "head_budget": (Code.LIMIT_HEAD_BUDGET, "unfinished request heads passed their shared budget: the largest "
                    "was closed"),
    "unproven_cap": (Code.LIMIT_UNPROVEN_CAP, "too many connections without a signed request: the oldest was "
                     "closed"),
}


def _connection_closed(metrics: Metrics, cause: str) -> None:
    metrics.connections_closed.labels(cause).inc()
    code, message = _LIMIT_CODES[cause]
    log_failure(code, message)


async def _security_shutdown(state: AgentState, server: asyncio.AbstractServer, runner: web.AppRunner,
                             front: LeanFront | None) -> None:
    """Not paired and no secret after AGENT_SECRET_TIMEOUT: close the API, keep the process (as Go)."""
    try:
        await asyncio.wait_for(state.verifier.wait_paired(), state.config.secret_timeout)
    except TimeoutError:
        log_failure(Code.AUTH_SECRET_TIMEOUT, "no Portainer instance paired with this agent in time: "
                    "the API server is shut down (restart the agent to pair again)",
                    timeout_seconds=state.config.secret_timeout)
        server.close()
        await asyncio.gather(runner.shutdown(), *([front.shutdown(SHUTDOWN_GRACE)] if front is not None else []))


async def run(config: Config, stop: asyncio.Event, slot: WorkerSlot | None = None) -> int:
    try:
        state = await build_state(config, slot)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    shared = slot is not None and slot.count > 1
    primary = slot is None or slot.primary
    view_task: asyncio.Task[None] | None = None
    if shared and slot is not None and primary:
        changed = asyncio.Event()
        state.membership.subscribe(lambda _members: changed.set())  # once: the supervised loop may restart
        view_task = supervise(partial(publish_view, state, slot.view_path, changed), "cluster-view")
    elif shared and slot is not None and state.info.swarm:
        assert isinstance(state.membership, StaticMembership)
        first = asyncio.Event()
        view_task = supervise(partial(follow_view, state, state.membership, slot.view_path, first), "cluster-view")
        try:
            await asyncio.wait_for(first.wait(), VIEW_WAIT)
        except TimeoutError:
            log.warning("no cluster view from worker 0 after %gs: serving with this node alone meanwhile",
                        VIEW_WAIT)
    edge: Any = None
    if config.edge:
        from edge.runtime import EdgeRuntime  # Edge mode only: keeps the standard agent's imports small

        try:
            edge = await EdgeRuntime.create(state)
        except ValueError as exc:  # a malformed EDGE_KEY or key file stops the agent, as in Go
            log.error("%s %s", getattr(exc, "code", Code.EDGE_KEY_INVALID), exc)
            await state.close()
            return 1
    state.engine.start_watch()
    swarm_watch = None
    if state.info.swarm and primary:
        watch = SwarmWatch(state.docker, state.membership, state.info, state.swarm_changed)
        swarm_watch = supervise(watch.run, "swarm-watch")
    app = build_app(state, [edge.middleware()] if edge is not None else None)
    if edge is not None:
        app[EDGE_KEY_HANDLER] = edge.key_handler
    # handler_cancellation: a caller that goes away cancels its handler, which closes the upstream stream
    # (a `logs -f` of a quiet container would otherwise hold its engine connection until the next line).
    # shutdown_timeout: on SIGTERM open requests get this long to end, then their handlers are cancelled,
    # which ends streams (logs -f, events, attach) cleanly; the whole stop stays far inside Docker's 10 s grace.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE,
                           handler_cancellation=True)
    await runner.setup()
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    front: LeanFront | None = None
    try:
        if edge is None:
            ctx = server_context(config, [state.advertise_addr, "127.0.0.1"])
            host = config.agent_host
            front = LeanFront(state, runner.server)
            factory: Any = server_protocol_factory(loop, front, ctx)
        else:
            # Edge: plain HTTP on the advertise address; only the tunnel (or the local node) reaches it.
            host = state.advertise_addr if config.agent_host == "0.0.0.0" else config.agent_host
            factory = runner.server
        server = await loop.create_server(state.guard.wrap(factory), host, config.agent_port,
                                          reuse_address=True, reuse_port=shared or None, backlog=1024)
    except OSError as exc:  # the port is taken, the address is not ours, a certificate does not load
        log.error("%s cannot serve the API on %s:%d: %s", Code.START_FAILED.value, config.agent_host,
                  config.agent_port, exc)
        await asyncio.gather(runner.cleanup(), *([edge.close()] if edge is not None else []))
        if view_task is not None:
            view_task.cancel()
        await state.close()  # stops the serf child and every background task: nothing is left running
        return 1
    if slot is not None:
        slot.ready_path(os.getpid()).touch()  # the supervisor restarts a worker that served, not one that failed
    log.info("agent listening on %s://%s:%d (node %s, %s, advertise %s, engine %s, event loop %s%s)",
             "http" if edge is not None else "https", host, config.agent_port, state.info.node_name,
             state.info.engine_status, state.advertise_addr, config.docker.url, type(loop).__module__,
             f", worker {slot.index} of {slot.count}, pid {os.getpid()}" if slot is not None and shared else "")
    if edge is not None:
        await edge.start()
    guard = None
    if not config.secret and not config.edge:
        guard = spawn(_security_shutdown(state, server, runner, front), "security-shutdown")
    try:
        await stop.wait()
    finally:
        started = time.monotonic()
        log.info("agent stopping")
        server.close()  # no new connections from here on
        if swarm_watch is not None:
            swarm_watch.cancel()
        if view_task is not None:
            view_task.cancel()
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        # Leaving the cluster, ending Edge and ending open requests do not depend on each other.
        await asyncio.gather(runner.cleanup(), state.membership.close(),
                             *([edge.close()] if edge is not None else []),
                             *([front.shutdown(SHUTDOWN_GRACE)] if front is not None else []))
        await state.close()
        log.info("agent stopped in %.2fs", time.monotonic() - started)
    return 0
