"""Edge mode's assembly: the key (edge/keystore.py) or the association page, the gate, and once a key is set
the poller, tunnel manager, jobs and stacks.

Go answers 403 to every request, ``/key`` included, while no key is set, which makes its ``POST /key`` and
key propagation unreachable. Here ``GET /key`` always answers (404 without a key) and ``POST /key`` is
accepted while the agent waits for a key, i.e. in the same window as the association page
(KEELSON_EDGE_UI_TIMEOUT, Go's 15 minutes from start); afterwards it gets Go's 403, so the key can not be
given by anyone on the network forever. A malformed key is a 400 (Go: 500). Every other request before a key
gets Go's 403, and every request afterwards counts as tunnel activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Coroutine
from typing import Any

import aiodocker
import aiohttp
from aiohttp import web

from agent.cluster.membership import Member
from agent.config import EdgeOptions
from agent.engine import own_container, read_engine_info
from agent.errors import Code, log_failure
from agent.netaddr import host_port
from agent.state import AgentState
from agent.tasks import spawn
from edge.client import PollError, PollResponse, PortainerClient, TlsFiles
from edge.cronjobs import CronJobs
from edge.gate import gate_middleware, handle_key
from edge.key import (
    EDGE_ID_FILE,
    EdgeKey,
    EdgeKeyError,
    KeyAlreadySetError,
    load_or_create_edge_id,
)
from edge.keystore import KeyStore
from edge.poller import Poller
from edge.schedules import ContainerJobRunner, Scheduler
from edge.stacks.engines import ComposeEngine, StackEngine, SwarmEngine
from edge.stacks.manager import StackManager
from edge.tunnel.base import ReverseTunnel, TunnelConfig
from edge.tunnel.manager import TunnelManager
from edge.ui import AssociationUI
from edge.updates import clean_after_update

log = logging.getLogger(__name__)

LEADER_CHECK_INTERVAL = 5.0



class EdgeRuntime:
    """The Edge side of one agent; agent.runtime calls create(), middleware(), key_handler, start(), close()."""

    def __init__(self, state: AgentState, options: EdgeOptions) -> None:
        self.state = state
        self.config = state.config
        self.options = options
        self.keys = KeyStore(state)
        self.edge_id = state.config.edge_id
        """EDGE_ID, or the identifier generated and kept in DATA_PATH when it is empty."""
        self.ui: AssociationUI | None = None
        self.client: PortainerClient | None = None
        self.poller: Poller | None = None
        self.tunnels: TunnelManager | None = None
        self.scheduler: Scheduler | CronJobs | None = None
        self.stacks: StackManager | None = None
        self._started = False
        self._services = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fetching = False
        self._leader = (0.0, True)
        self._accept_until = 0.0
        """Loop time until which a key may still arrive by POST /key or from the cluster (the page's window)."""

    # --- construction and key lookup ---------------------------------------------------------------------

    @property
    def listen_host(self) -> str:
        """Where the Edge API listens (agent.runtime): the advertise address unless AGENT_HOST names one."""
        return self.state.advertise_addr if self.config.agent_host == "0.0.0.0" else self.config.agent_host

    @classmethod
    async def create(cls, state: AgentState) -> EdgeRuntime:
        """Look the key up; raises ValueError for a malformed EDGE_KEY or key file (the agent exits 1)."""
        runtime = cls(state, state.config.edge_options)
        config = state.config
        if not config.edge_id:
            try:
                runtime.edge_id, created = await asyncio.to_thread(load_or_create_edge_id, config.data_path)
                log.warning("EDGE_ID is empty: using %s identifier %s (DATA_PATH/%s)",
                            "the new" if created else "the kept", runtime.edge_id, EDGE_ID_FILE)
            except OSError as exc:
                log_failure(Code.EDGE_KEY_STORE_FAILED, f"EDGE_ID is empty and none can be kept in "
                            f"{config.data_path}: {exc}; Portainer refuses polls without an Edge identifier")
        if config.edge_async:
            log.warning("EDGE_ASYNC is not supported by Keelson: using the standard (polling) Edge mode")
        await runtime.keys.lookup()
        return runtime

    @property
    def key(self) -> EdgeKey | None:
        return self.keys.key

    @property
    def key_source(self) -> str:
        return self.keys.source

    # --- setting the key later (page, API, cluster) ------------------------------------------------------

    async def set_key(self, text: str, source: str) -> None:
        """Raises EdgeKeyError (malformed) or KeyAlreadySetError; starts the Edge services on success."""
        await self.keys.take(text, source)
        if self._started:
            self._start_services()
        if self.ui is not None and source != "association page":
            self.ui.close_soon()
        if not source.startswith("cluster"):
            self._spawn(self.keys.propagate())

    @property
    def accepting_keys(self) -> bool:
        """No key yet and still inside the association window (see the module docstring)."""
        return self.keys.key is None and asyncio.get_running_loop().time() < self._accept_until

    def _members_changed(self, members: list[Member]) -> None:
        """While waiting for a key: take it from a member that got one (ours; Go looks only at start)."""
        if not self.accepting_keys or self._fetching:
            return
        me = self.state.info.node_name
        if any(m.edge_key_set and m.node_name != me for m in members):
            self._spawn(self._fetch_from_cluster())

    async def _fetch_from_cluster(self) -> None:
        self._fetching = True
        try:
            text, source = await self.keys.from_cluster()
            if text and self.key is None:
                with contextlib.suppress(KeyAlreadySetError):
                    await self.set_key(text, source)
        except EdgeKeyError as exc:
            log_failure(Code.EDGE_KEY_INVALID, f"the key handed over by the cluster is unusable: {exc}")
        finally:
            self._fetching = False

    async def _key_from_page(self, text: str) -> None:
        await self.set_key(text, "association page")

    # --- HTTP: the gate and /key (edge/gate.py) -------------------------------------------------------------

    def middleware(self) -> Any:
        return gate_middleware(self)

    def current_key(self) -> str:
        """As Go's GetKey: the key re-encoded, a global key carrying the endpoint id Portainer gave us."""
        key = self.key
        if key is None:
            return ""
        if key.is_global and self.client is not None and self.client.endpoint_id:
            return dataclasses.replace(key, endpoint_id=self.client.endpoint_id).encode()
        return key.encode()

    async def key_handler(self, request: web.Request) -> web.StreamResponse:
        return await handle_key(self, request)

    def record_activity(self) -> None:
        if self.tunnels is not None:
            self.tunnels.record_activity()

    # --- services -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Called once the API listens: start polling, or open the association page (never blocks)."""
        self._started = True
        if self.config.update_id:
            self._spawn(self._clean_after_update(self.config.update_id))
        if self.key is not None:
            self._start_services()
            return
        self._accept_until = asyncio.get_running_loop().time() + self.options.ui_timeout
        self.state.membership.subscribe(self._members_changed)
        self.ui = AssociationUI(self.config.edge_server_host, self.config.edge_server_port, self._key_from_page,
                                self.options.ui_timeout)
        try:
            await self.ui.start()
        except OSError as exc:
            log_failure(Code.EDGE_UI_FAILED, f"no Edge key, and the association page cannot listen on "
                        f"{host_port(self.config.edge_server_host, self.config.edge_server_port)}: {exc}; "
                        "set EDGE_KEY or POST /key")
            self.ui = None

    def _tunnel_server(self, key: EdgeKey) -> str:
        if self.options.transport == "ssh":
            return host_port(key.tunnel_host, key.tunnel_port)
        return key.tunnel_url

    def _make_tunnel(self, config: TunnelConfig) -> ReverseTunnel:
        if self.options.transport == "ssh":
            from edge.tunnel.ssh import SshTunnel

            return SshTunnel(config, client_keys=[self.options.ssh_key] if self.options.ssh_key else None)
        from edge.tunnel.chisel import ChiselTunnel

        tls: ssl.SSLContext | bool = self.client.ssl_context if self.client is not None else True
        return ChiselTunnel(config, ssl=tls)

    def _start_services(self) -> None:
        key = self.key
        if self._services or key is None:
            return
        self._services = True
        config = self.config
        self.client = PortainerClient(
            key.portainer_url, self.edge_id, key.endpoint_id, update_id=config.update_id,
            tls=TlsFiles(config.mtls_cert, config.mtls_key, config.mtls_ca, config.edge_insecure_poll),
            edge_groups=config.edge_groups, tags=config.portainer_tags, environment_group=config.portainer_group,
        )
        if config.edge_tunnel:
            self.tunnels = TunnelManager(
                self._make_tunnel, server=self._tunnel_server(key), fingerprint=key.fingerprint,
                local_host=self.listen_host, local_port=config.agent_port, edge_id=self.edge_id,
                inactivity_timeout=config.edge_inactivity_timeout,
                proxy=config.edge_tunnel_proxy or None,  # the flags --edge-tunnel-http(s)-proxy, or the variables
            )
            self.tunnels.start()
        if self.options.job_runner == "container":
            runner = ContainerJobRunner(self.state.docker, self.options.job_image, self.options.job_memory,
                                        self.options.job_cpus, self.options.job_timeout)
            self._spawn(runner.remove_leftovers())
            self.scheduler = Scheduler(runner, config.data_path / "edge_jobs", self.client.send_job_logs)
        else:
            self.scheduler = CronJobs(config.host_root, self.client.send_job_logs)
        self.stacks = StackManager(self.client, self._stack_engine, config.data_path / "edge_stacks",
                                   edge_id=self.edge_id, docker_host=config.docker.url,
                                   retry=self.options.stack_retry, active=self._should_poll)
        self.stacks.start()
        self.poller = Poller(self.client, self._on_status, global_key=key.is_global,
                             interval=self.options.poll_interval, max_backoff=self.options.poll_max_backoff,
                             should_poll=self._should_poll)
        self.poller.start()
        log.info("Edge agent polling %s every %gs (tunnel %s, inactivity timeout %gs)", key.portainer_url,
                 self.options.poll_interval, self.options.transport if config.edge_tunnel else "disabled",
                 config.edge_inactivity_timeout)

    async def _on_status(self, response: PollResponse) -> None:
        if self.tunnels is not None:
            self.tunnels.apply(response.status, response.port, response.credentials)
        if self.scheduler is not None:
            self.scheduler.apply(response.schedules)
        if self.stacks is not None:
            try:
                await self.stacks.apply(response.stacks)
            except (PollError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Go ends the poll's stack handling at the first fetch error; the next poll tries again.
                log_failure(Code.EDGE_STACK_FAILED, f"Edge stacks not updated this poll: {exc}")

    async def _stack_engine(self) -> StackEngine:
        """Compose on a standalone engine, ``docker stack`` in a Swarm (Go re-checks this every 5 s)."""
        docker = self.state.docker
        info = await read_engine_info(docker, await docker.system.info())
        if info.swarm:
            return SwarmEngine(docker, compose=self.options.compose)
        return ComposeEngine(docker, compose=self.options.compose)

    async def _clean_after_update(self, update_id: int) -> None:
        docker = self.state.docker
        try:
            own = await own_container(docker)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            own = None
        await clean_after_update(docker, update_id, own["Id"] if own else "")

    async def _should_poll(self) -> bool:
        """Only a standalone engine or the Swarm leader polls (Go: checkDockerRuntimeConfig every 5 s)."""
        if not self.state.info.swarm:
            return True
        loop = asyncio.get_running_loop()
        checked, leader = self._leader
        if loop.time() - checked >= LEADER_CHECK_INTERVAL:
            try:
                docker = self.state.docker
                leader = (await read_engine_info(docker, await docker.system.info())).leader
            # keep the last answer while the engine is unreachable
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("leader check failed: %s", exc)
            if leader != self._leader[1]:
                log.info("this node %s the Swarm leader: Edge polling %s", "is" if leader else "is no longer",
                         "on" if leader else "off")
            self._leader = (loop.time(), leader)
        return leader

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = spawn(coro, "edge-runtime")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self.ui is not None:
            await self.ui.close()
        if self.poller is not None:
            await self.poller.close()
        if self.tunnels is not None:
            await self.tunnels.close()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.stacks is not None:
            await self.stacks.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.client is not None:
            await self.client.close()
