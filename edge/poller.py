"""The Edge poll loop (Go: edge/poll.go startStatusPollLoop / poll), without its failure modes.

Every interval: resolve a global key's endpoint id if needed, GET the status, hand the answer to the tunnel
manager and the scheduler, adopt the server's ``checkin`` as the new interval (and, as Go, as the HTTP
timeout, here never below 5 s). A failure is one EDGE_POLL_FAILED line and a jittered, growing wait
(Go waits one interval plus a random part of one); nothing a server answers stops the loop.
Differences from Go: the first poll happens at once (Go waits one interval), and after a failure the wait
doubles up to KEELSON_EDGE_POLL_MAX_BACKOFF instead of staying near one interval.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp

from agent.errors import Code, log_failure
from agent.tasks import cancel, supervise
from edge.client import PollError, PollResponse, PortainerClient

log = logging.getLogger(__name__)

MIN_HTTP_TIMEOUT = 5.0

StatusHandler = Callable[[PollResponse], Awaitable[None]]


def backoff_delay(interval: float, failures: int, max_backoff: float, rnd: Callable[[], float] = random.random,
                  ) -> float:
    """Wait after ``failures`` consecutive failures: interval * 2^(n-1), capped, times a random 0.5..1.5."""
    base = min(max_backoff, interval * (2 ** min(failures - 1, 30)))
    return base * (0.5 + rnd())


class Poller:
    """Runs until closed; ``should_poll`` lets a Swarm worker stay quiet (only the leader polls, as in Go)."""

    def __init__(self, client: PortainerClient, on_status: StatusHandler, *, global_key: bool,
                 interval: float = 5.0, max_backoff: float = 60.0,
                 should_poll: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.client = client
        self.on_status = on_status
        self.global_key = global_key
        self.interval = interval
        self.max_backoff = max(max_backoff, interval)
        self.should_poll = should_poll
        self.failures = 0
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = supervise(self._run, "edge-poller")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def poll_once(self) -> PollResponse:
        """One poll; raises PollError (or a network error) when there is no usable answer."""
        if self.global_key and self.client.endpoint_id == 0:
            self.client.endpoint_id = await self.client.global_key()
            log.info("global Edge key: Portainer knows this agent as endpoint %d", self.client.endpoint_id)
        try:
            return await self.client.status()
        except PollError as exc:
            if self.global_key and exc.status is not None and exc.status != 304:
                self.client.endpoint_id = 0  # Go: a non-OK answer makes a global key ask for its id again
            raise

    async def _run(self) -> None:
        while True:
            if self.should_poll is not None and not await self.should_poll():
                await asyncio.sleep(self.interval)
                continue
            delay = await self._cycle()
            await asyncio.sleep(delay)

    async def _cycle(self) -> float:
        """Poll and dispatch once; returns how long to wait before the next poll."""
        self.polls += 1
        try:
            response = await self.poll_once()
        except (PollError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.failures += 1
            delay = backoff_delay(self.interval, self.failures, self.max_backoff)
            detail = str(exc) or type(exc).__name__
            log_failure(Code.EDGE_POLL_FAILED, f"poll of {self.client.url} failed: {detail}",
                        endpoint=self.client.endpoint_id, failures=self.failures, retry_in=round(delay, 1))
            return delay
        if self.failures:
            log.info("poll of %s succeeded again after %d failed attempt(s)", self.client.url, self.failures)
            self.failures = 0
        for reason in response.dropped:
            log_failure(Code.EDGE_JOB_FAILED, f"malformed schedule in the poll response ignored: {reason}")
        log.debug("poll: status=%s port=%d schedules=%d checkin=%g", response.status, response.port,
                  len(response.schedules), response.checkin)
        try:
            await self.on_status(response)
        except Exception as exc:  # a bug in a consumer must not stop polling
            log_failure(Code.EDGE_POLL_FAILED, f"handling the poll response failed: {exc!r}")
        if response.checkin > 0 and response.checkin != self.interval:
            log.info("poll interval %gs -> %gs (server checkin)", self.interval, response.checkin)
            self.interval = response.checkin
            self.max_backoff = max(self.max_backoff, self.interval)
            self.client.timeout = max(response.checkin, MIN_HTTP_TIMEOUT)
        return self.interval
