"""Portainer's calls (tests/portainer_replay.py) replayed against one agent on a standalone engine, at the web
UI's version (1.41, also what the server negotiates with this engine) and at versions this engine does not
support (1.44, 1.45: Portainer's server on a newer entry node)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.hub_standin import ThreadedHub
from tests.portainer_replay import Cluster, Portainer, server_snapshot, ui_views
from tools.agentproc import AgentProcess
from tools.dockerd import PrivateDockerd

VERSIONS = ["1.41", "1.44", "1.45"]


@pytest.fixture(scope="module")
def replay_agent(engine: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    hub = ThreadedHub().start()
    proc = AgentProcess(engine.host, tmp_path_factory.mktemp("replay"), env=hub.agent_env())
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        hub.stop()


@pytest.fixture(scope="module")
def world(engine: PrivateDockerd) -> Iterator[tuple[Cluster, str]]:
    name = f"replay-{uuid.uuid4().hex[:6]}"
    volume = f"replayvol-{uuid.uuid4().hex[:6]}"
    engine.cli("run", "-d", "--name", name, "busybox:local", "sh", "-c", f"echo hello from {name}; sleep 600")
    engine.cli("volume", "create", volume)
    info_name = engine.cli("info", "--format", "{{.Name}}").stdout.strip()
    try:
        yield Cluster(entry=info_name, nodes=[info_name], swarm=False, containers={name: info_name}), volume
    finally:
        engine.cli("rm", "-f", name, check=False)
        engine.cli("volume", "rm", "-f", volume, check=False)


@pytest.fixture
async def portainer(replay_agent: AgentProcess) -> AsyncIterator[Portainer]:
    async with aiohttp.ClientSession() as session:
        yield Portainer(replay_agent.url, replay_agent.signer, session)


@pytest.mark.parametrize("version", VERSIONS)
async def test_server_snapshot(portainer: Portainer, world: tuple[Cluster, str], version: str) -> None:
    cluster, _ = world
    await server_snapshot(portainer, version, cluster)


@pytest.mark.parametrize("version", VERSIONS)
async def test_web_ui_views(portainer: Portainer, world: tuple[Cluster, str], version: str,
                            engine: PrivateDockerd) -> None:
    cluster, volume = world
    try:
        await ui_views(portainer, cluster, volume, version)
    finally:
        engine.cli("run", "--rm", "-v", f"{volume}:/v", "busybox:local", "rm", "-f", "/v/replay.txt")
