"""Tunnel life cycle driven by the poll status (Go: edge/poll.go manageUpdateTunnel + activity monitor).

* REQUIRED (with port and encrypted credentials) opens the tunnel when it is not open;
* ACTIVE keeps whatever is there; IDLE closes it;
* no API request for EDGE_INACTIVITY_TIMEOUT closes it (an open counts as activity). As in Go, a REQUIRED
  that is still being answered afterwards opens it again (Portainer stops answering REQUIRED after 4m30s
  without use, before the agent's default 5m);
* a tunnel the server or the network dropped is reopened with the same credentials after a short jittered
  wait that grows with repeated failures (Go's chisel client reconnects by itself), until IDLE;
* a host key that does not match the key's fingerprint refuses the tunnel (one clear EDGE_TUNNEL_FAILED line)
  and is not retried for that server session: only new credentials (a new REQUIRED session) try again.

Opening runs in its own task, so a slow or unreachable tunnel server never delays polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.errors import Code, log_failure
from agent.tasks import spawn, supervise
from edge.client import STATUS_IDLE, STATUS_REQUIRED
from edge.credentials import CredentialsError, decrypt_credentials
from edge.tunnel.base import FingerprintMismatchError, ReverseTunnel, TunnelConfig, TunnelError

log = logging.getLogger(__name__)

TunnelFactory = Callable[[TunnelConfig], ReverseTunnel]
MAX_CHECK_INTERVAL = 30.0
"""Go checks inactivity every 30 s; shorter timeouts are checked proportionally more often."""


@dataclass(frozen=True)
class Session:
    """One REQUIRED answer's tunnel: the server-side port and the encrypted credentials."""

    port: int
    credentials: str


class TunnelManager:
    def __init__(self, factory: TunnelFactory, *, server: str, fingerprint: str, local_host: str,
                 local_port: int, edge_id: str, inactivity_timeout: float, retry_base: float = 1.0,
                 retry_max: float = 30.0, proxy: str | None = None) -> None:
        self._factory = factory
        self._proxy = proxy
        self._server = server
        self._fingerprint = fingerprint
        self._local = (local_host, local_port)
        self._edge_id = edge_id
        self.inactivity_timeout = inactivity_timeout
        self.check_interval = min(MAX_CHECK_INTERVAL, max(0.1, inactivity_timeout / 4))
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._session: Session | None = None
        self._refused: Session | None = None
        self._tunnel: ReverseTunnel | None = None
        self._opening: ReverseTunnel | None = None
        self._failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._last_activity = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: list[asyncio.Task[None]] = []
        self.opened = 0
        """How many times a tunnel was opened (for logs and tests)."""

    # --- inputs -------------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._tunnel is not None and self._tunnel.is_open

    def record_activity(self) -> None:
        """An API request arrived (the Edge middleware calls this for every request)."""
        self._last_activity = asyncio.get_running_loop().time()

    def apply(self, status: str, port: int, credentials: str) -> None:
        """Act on one poll answer (never blocks: the supervisor task does the work)."""
        if status == STATUS_IDLE:
            if self._session is not None or self.is_open or self._opening is not None:
                log.info("Edge status IDLE: closing the tunnel")
            self._session = None
            self._refused = None
            self._cancel_retry()
            if self._opening is not None:
                self._spawn(self._opening.close())
            self._wake.set()
            return
        if status != STATUS_REQUIRED or self.is_open or self._opening is not None:
            return  # ACTIVE keeps the current state; REQUIRED with an open tunnel needs nothing
        if port <= 0 or not credentials:
            log_failure(Code.EDGE_TUNNEL_FAILED, "status REQUIRED without a port or credentials", port=port)
            return
        session = Session(port, credentials)
        if session == self._refused:
            return  # already refused (fingerprint or credentials): wait for a new server session
        if session == self._session and self._retry is not None:
            return  # a retry is already scheduled
        if session != self._session:
            self._cancel_retry()
            self._failures = 0
        self._session = session
        self._wake.set()

    # --- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._main:
            # supervised: an unexpected error is logged and the loop restarts, never a silent end
            self._main = [supervise(self._supervise, "edge-tunnel-supervisor"),
                          supervise(self._watch_inactivity, "edge-tunnel-inactivity")]

    async def close(self) -> None:
        self._session = None
        self._cancel_retry()
        for task in self._main:
            task.cancel()
        for task in self._main:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._main = []
        for tunnel in (self._opening, self._tunnel):
            if tunnel is not None:
                await tunnel.close()
        self._opening = self._tunnel = None
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- internals ----------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = spawn(coro, "edge-tunnel")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _schedule_retry(self) -> None:
        self._failures += 1
        base = min(self._retry_max, self._retry_base * 2 ** min(self._failures - 1, 20))
        delay = base * (0.5 + random.random())

        def fire() -> None:
            self._retry = None
            self._wake.set()

        self._cancel_retry()
        self._retry = asyncio.get_running_loop().call_later(delay, fire)

    async def _supervise(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            session = self._session
            if session is None:
                tunnel, self._tunnel = self._tunnel, None
                if tunnel is not None:
                    await tunnel.close()
                    log.info("Edge tunnel closed")
                continue
            if self.is_open or self._retry is not None:
                continue
            await self._open(session)

    async def _open(self, session: Session) -> None:
        try:
            user, password = decrypt_credentials(session.credentials, self._edge_id)
        except CredentialsError as exc:
            log_failure(Code.EDGE_TUNNEL_FAILED, f"cannot use the tunnel credentials: {exc} (check EDGE_ID)")
            self._refused, self._session = session, None
            return
        config = TunnelConfig(server=self._server, remote_port=session.port, local_host=self._local[0],
                              local_port=self._local[1], username=user, password=password,
                              fingerprint=self._fingerprint, proxy=self._proxy)
        tunnel = self._factory(config)
        self._opening = tunnel
        try:
            await tunnel.open()  # logs its own EDGE_TUNNEL_FAILED line on failure
        except FingerprintMismatchError:
            self._refused, self._session = session, None
            return
        except TunnelError:
            if self._session == session:
                self._schedule_retry()
            return
        finally:
            self._opening = None
        if self._session != session:  # IDLE (or a new session) arrived while opening
            await tunnel.close()
            self._wake.set()
            return
        self._tunnel = tunnel
        self._failures = 0
        self.opened += 1
        self.record_activity()
        self._spawn(self._watch_drop(tunnel, session))

    async def _watch_drop(self, tunnel: ReverseTunnel, session: Session) -> None:
        await tunnel.wait_closed()
        if self._tunnel is not tunnel:
            return  # closed by us
        self._tunnel = None
        if self._session == session:
            log.info("Edge tunnel dropped; reopening it")
            self._schedule_retry()

    async def _watch_inactivity(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_interval)
            idle = loop.time() - self._last_activity
            if self.is_open and idle > self.inactivity_timeout:
                log.info("closing the Edge tunnel after %.0fs without API requests (EDGE_INACTIVITY_TIMEOUT %gs)",
                         idle, self.inactivity_timeout)
                self._session = None
                self._cancel_retry()
                self._wake.set()
