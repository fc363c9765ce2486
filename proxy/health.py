"""Which peers a fan-out skips for now: a node that just failed is left out at once, for a back-off period,
until a cheap probe (`GET /ping`, which needs no signature) shows its agent back.

A dead node then costs one connect deadline, once, instead of a deadline on every listing until Serf
declares it failed (several seconds); a slow node that does answer is waited for, and never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.tasks import spawn

log = logging.getLogger(__name__)

Probe = Callable[[str, int], Awaitable[bool]]
"""(ip, agent port) -> whether the agent answered its ping."""


@dataclass
class _Down:
    reason: str
    since: float
    backoff: float
    next_probe: float


class PeerHealth:
    """Peers that failed recently, by node name, with a background probe that brings them back."""

    def __init__(self, probe: Probe, first_backoff: float = 1.0, max_backoff: float = 10.0) -> None:
        self._probe = probe
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._down: dict[str, _Down] = {}
        self._probing: set[str] = set()

    def skipped(self, node: str) -> str | None:
        """Why `node` is skipped now, or None when it should be asked."""
        down = self._down.get(node)
        if down is None:
            return None
        return f"skipped: {down.reason} {time.monotonic() - down.since:.0f}s ago, not back yet"

    def failed(self, node: str, ip: str, port: int, reason: str) -> None:
        """`node` did not connect or did not answer in time: skip it until a probe answers."""
        now = time.monotonic()
        down = self._down.get(node)
        if down is None:
            self._down[node] = down = _Down(reason, now, self.first_backoff, now + self.first_backoff)
            log.info("node %s left out of fan-outs until it answers again: %s", node, reason)
        self._schedule(node, ip, port)

    def answered(self, node: str) -> None:
        if self._down.pop(node, None) is not None:
            log.info("node %s answers again: back in fan-outs", node)

    def forget(self, keep: set[str]) -> None:
        """Drop nodes that are no longer members."""
        for node in [n for n in self._down if n not in keep]:
            del self._down[node]

    def members_changed(self, before: set[str], now: set[str]) -> None:
        """A node that left the membership and is back (a restarted agent, a healed link) is asked again."""
        for node in now - before:
            self.answered(node)
        self.forget(now)

    def _schedule(self, node: str, ip: str, port: int) -> None:
        if node in self._probing:
            return
        self._probing.add(node)
        spawn(self._probe_until_back(node, ip, port), f"probe-{node}")

    async def _probe_until_back(self, node: str, ip: str, port: int) -> None:
        try:
            while (down := self._down.get(node)) is not None:
                await asyncio.sleep(max(0.0, down.next_probe - time.monotonic()))
                if node not in self._down:
                    return
                if await self._probe(ip, port):
                    self.answered(node)
                    return
                down.backoff = min(down.backoff * 2, self.max_backoff)
                down.next_probe = time.monotonic() + down.backoff
        finally:
            self._probing.discard(node)
