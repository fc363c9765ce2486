"""TunnelManager decisions with scripted tunnels: status rules, drops, refusals, inactivity."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edge.credentials import encrypt_credentials
from edge.tunnel.base import FingerprintMismatchError, ReverseTunnel, TunnelConfig, TunnelConnectError
from edge.tunnel.manager import TunnelManager
from tests.edge.conftest import eventually

pytestmark = pytest.mark.edge

EDGE_ID = "edge-tunnels"


class ScriptedTunnel(ReverseTunnel):
    """open() takes its outcome from the factory's script; drop() plays the server closing the connection."""

    def __init__(self, config: TunnelConfig, outcome: BaseException | None, gate: asyncio.Event) -> None:
        super().__init__(config)
        self.outcome = outcome
        self.gate = gate
        self._open = False
        self._closed = asyncio.Event()
        self._closed.set()
        self.closed_by_us = False

    async def open(self) -> None:
        await self.gate.wait()
        if self.outcome is not None:
            raise self.outcome
        self._open = True
        self._closed.clear()

    async def close(self) -> None:
        self.closed_by_us = True
        self.gate.set()
        self._open = False
        self._closed.set()

    def drop(self) -> None:
        self._open = False
        self._closed.set()

    @property
    def is_open(self) -> bool:
        return self._open

    async def wait_closed(self) -> None:
        await self._closed.wait()


class Factory:
    def __init__(self) -> None:
        self.script: list[BaseException | None] = []
        self.made: list[ScriptedTunnel] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def __call__(self, config: TunnelConfig) -> ReverseTunnel:
        tunnel = ScriptedTunnel(config, self.script.pop(0) if self.script else None, self.gate)
        self.made.append(tunnel)
        return tunnel


def manager(factory: Factory, inactivity: float = 300.0) -> TunnelManager:
    return TunnelManager(factory, server="ws://127.0.0.1:1/", fingerprint="x" * 43 + "=", local_host="127.0.0.1",
                         local_port=9001, edge_id=EDGE_ID, inactivity_timeout=inactivity, retry_base=0.05,
                         retry_max=0.2)


def creds(user: str = "u1") -> str:
    return encrypt_credentials(user, "pw", EDGE_ID)


async def test_required_active_idle() -> None:
    factory = Factory()
    tm = manager(factory)
    tm.start()
    try:
        tm.apply("REQUIRED", 50001, creds())
        await eventually(lambda: tm.is_open)
        made = factory.made[0]
        assert (made.config.username, made.config.password, made.config.remote_port) == ("u1", "pw", 50001)
        assert (made.config.local_host, made.config.local_port) == ("127.0.0.1", 9001)
        tm.apply("REQUIRED", 50001, creds())  # already open: nothing
        tm.apply("ACTIVE", 0, "")
        await asyncio.sleep(0.05)
        assert tm.is_open and len(factory.made) == 1
        tm.apply("IDLE", 0, "")
        await eventually(lambda: not tm.is_open and made.closed_by_us)
    finally:
        await tm.close()


async def test_server_drop_reopens_until_idle() -> None:
    factory = Factory()
    tm = manager(factory)
    tm.start()
    try:
        tm.apply("REQUIRED", 50002, creds())
        await eventually(lambda: tm.is_open)
        factory.script = [TunnelConnectError("server restarting"), None]
        factory.made[0].drop()
        await eventually(lambda: len(factory.made) == 3 and tm.is_open)  # one failed attempt, then open
        tm.apply("ACTIVE", 0, "")
        factory.made[-1].drop()
        await eventually(lambda: len(factory.made) == 4 and tm.is_open)  # ACTIVE: still reconnects
        tm.apply("IDLE", 0, "")
        await eventually(lambda: not tm.is_open)
        factory.made[-1].drop()
        await asyncio.sleep(0.3)
        assert len(factory.made) == 4
    finally:
        await tm.close()


async def test_fingerprint_mismatch_is_not_retried_for_the_same_session() -> None:
    factory = Factory()
    factory.script = [FingerprintMismatchError("host key fingerprint is A, expected B")]
    tm = manager(factory)
    tm.start()
    try:
        session = creds()
        tm.apply("REQUIRED", 50003, session)
        await eventually(lambda: len(factory.made) == 1 and tm._refused is not None)
        for _ in range(3):
            tm.apply("REQUIRED", 50003, session)
            await asyncio.sleep(0.05)
        assert len(factory.made) == 1
        tm.apply("REQUIRED", 50004, creds("u2"))  # a new server session tries again
        await eventually(lambda: tm.is_open and len(factory.made) == 2)
    finally:
        await tm.close()


async def test_bad_credentials_and_idle_while_opening(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    factory = Factory()
    tm = manager(factory)
    tm.start()
    try:
        tm.apply("REQUIRED", 50005, encrypt_credentials("u", "p", "another-edge-id"))
        await eventually(lambda: any("check EDGE_ID" in r.getMessage() for r in caplog.records))
        assert not factory.made
        factory.gate.clear()  # the next open hangs until closed
        tm.apply("REQUIRED", 50006, creds())
        await eventually(lambda: len(factory.made) == 1)
        tm.apply("IDLE", 0, "")
        await eventually(lambda: factory.made[0].closed_by_us)
        await asyncio.sleep(0.05)
        assert not tm.is_open
    finally:
        await tm.close()


async def test_inactivity_closes_and_activity_keeps_open() -> None:
    factory = Factory()
    tm = manager(factory, inactivity=1.0)
    tm.start()
    try:
        tm.apply("REQUIRED", 50007, creds())
        await eventually(lambda: tm.is_open)
        tm.apply("ACTIVE", 0, "")
        for _ in range(12):  # requests keep it open past the timeout
            tm.record_activity()
            await asyncio.sleep(0.1)
        assert tm.is_open
        await eventually(lambda: not tm.is_open, timeout=5)
        tm.apply("ACTIVE", 0, "")
        await asyncio.sleep(0.2)
        assert not tm.is_open and len(factory.made) == 1  # ACTIVE does not reopen; REQUIRED would (as Go)
    finally:
        await tm.close()
