"""Portainer's calls (tests/portainer_replay.py) replayed on the namespace Swarm, through a manager's and a
worker's agent, at the web UI's version and at versions these engines do not support; each node adapts the
caller's version for its own engine. Encoded bodies through every hop (local, peer, fan-out)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.cluster.test_cluster import AGENT_ENV
from tests.hub_standin import ThreadedHub
from tests.portainer_replay import TARGET, Cluster, Portainer, server_snapshot, ui_views
from tools.agentproc import insecure_context
from tools.swarm import SwarmCluster

VERSIONS = ["1.41", "1.44", "1.45"]


@pytest.fixture(scope="module")
def replay_swarm(swarm: SwarmCluster) -> Iterator[SwarmCluster]:
    """The session Swarm with an agent per node; Docker Hub's stand-in on the bridge's own address."""
    assert swarm.subnet is not None
    hub = ThreadedHub(host=str(next(swarm.subnet.hosts()))).start()
    swarm.start_agents(env={**AGENT_ENV, **hub.agent_env()})
    try:
        swarm.wait_agents(120)
        yield swarm
    finally:
        swarm.stop_agents()
        hub.stop()


@pytest.fixture(scope="module")
def world(replay_swarm: SwarmCluster) -> Iterator[tuple[dict[str, str], str]]:
    """A running container on every node (name -> node) and a volume on node 3."""
    made: dict[str, str] = {}
    volume = f"replayvol-{uuid.uuid4().hex[:6]}"
    for node in replay_swarm:
        name = f"replay-{node.name}-{uuid.uuid4().hex[:4]}"
        node.cli("run", "-d", "--name", name, "busybox:local", "sh", "-c", f"echo hello from {name}; sleep 600")
        made[name] = node.name
    replay_swarm.node(3).cli("volume", "create", volume)
    try:
        yield made, volume
    finally:
        for name, node_name in made.items():
            next(n for n in replay_swarm if n.name == node_name).cli("rm", "-f", name, check=False)
        replay_swarm.node(3).cli("volume", "rm", "-f", volume, check=False)


def cluster_view(swarm: SwarmCluster, entry: int, containers: dict[str, str]) -> Cluster:
    return Cluster(entry=swarm.node(entry).name, nodes=[n.name for n in swarm], swarm=True, containers=containers)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def portainer(swarm: SwarmCluster, entry: int, session: aiohttp.ClientSession) -> Portainer:
    return Portainer(swarm.node(entry).agent_url, swarm.signer, session)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("entry", [1, 3])
async def test_server_snapshot(replay_swarm: SwarmCluster, world: tuple[dict[str, str], str],
                               session: aiohttp.ClientSession, version: str, entry: int) -> None:
    containers, _ = world
    await server_snapshot(portainer(replay_swarm, entry, session), version,
                          cluster_view(replay_swarm, entry, containers))


@pytest.mark.parametrize("version", VERSIONS)
async def test_web_ui_views_through_a_worker(replay_swarm: SwarmCluster, world: tuple[dict[str, str], str],
                                             session: aiohttp.ClientSession, version: str) -> None:
    containers, volume = world
    try:
        await ui_views(portainer(replay_swarm, 2, session), cluster_view(replay_swarm, 2, containers), volume,
                       version)
    finally:
        replay_swarm.node(3).cli("run", "--rm", "-v", f"{volume}:/v", "busybox:local", "rm", "-f", "/v/replay.txt")


def adapted_down(swarm: SwarmCluster, node: int) -> float:
    status, _, body = swarm.agent_request(node, "GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith('keelson_api_version_adapted_total{direction="down"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_serving_node_adapts_the_version_for_its_own_engine(replay_swarm: SwarmCluster) -> None:
    before = {i: adapted_down(replay_swarm, i) for i in (1, 2, 3)}
    # a node operation through node 1 for node 3: node 1 forwards the caller's version, node 3 adapts it
    status, _, body = replay_swarm.agent_request(1, "GET", "/v1.45/version",
                                                 headers={TARGET: replay_swarm.node(3).name})
    assert status == 200 and json.loads(body)["ApiVersion"] == "1.41"
    assert adapted_down(replay_swarm, 3) == before[3] + 1
    assert adapted_down(replay_swarm, 1) == before[1]
    # a fan-out: each node adapts its own part
    status, headers, body = replay_swarm.agent_request(2, "GET", "/v1.45/containers/json?all=1", timeout=15)
    assert status == 200 and "X-Keelson-Failed-Nodes" not in headers
    assert {i["Portainer"]["Agent"]["NodeName"] for i in json.loads(body)} >= {n.name for n in replay_swarm}
    assert [adapted_down(replay_swarm, i) for i in (1, 2, 3)] == [before[1] + 1, before[2] + 1, before[3] + 2]


def test_a_listing_that_names_another_node_carries_node_names(replay_swarm: SwarmCluster,
                                                             world: tuple[dict[str, str], str]) -> None:
    containers, _ = world
    node3 = replay_swarm.node(3).name
    status, _, body = replay_swarm.agent_request(1, "GET", "/v1.41/containers/json", headers={TARGET: node3})
    items = json.loads(body)
    assert status == 200 and items
    assert {i["Portainer"]["Agent"]["NodeName"] for i in items} == {node3}
    assert {n for n, node in containers.items() if node == node3} <= {i["Names"][0].lstrip("/") for i in items}


def test_normalised_paths_route_once_on_a_worker(replay_swarm: SwarmCluster) -> None:
    # on a worker, `/services/../containers/json` is the container listing (a fan-out), not a manager call
    status, headers, body = replay_swarm.agent_request(3, "GET", "/v1.41/services/../containers/json?all=1",
                                                       timeout=15)
    assert status == 200 and "X-Keelson-Failed-Nodes" not in headers
    assert {i["Portainer"]["Agent"]["NodeName"] for i in json.loads(body)} == {n.name for n in replay_swarm}


def build_context(marker: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", b"FROM busybox:local\nCOPY marker /marker\n"), ("marker", marker.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_encoded_bodies_through_a_peer_and_a_fanout(replay_swarm: SwarmCluster,
                                                          session: aiohttp.ClientSession) -> None:
    node3 = replay_swarm.node(3)
    tag = f"gzpeer-{uuid.uuid4().hex[:6]}:1"
    headers = {**replay_swarm.signer.headers(), TARGET: node3.name, "Content-Type": "application/x-tar",
               "Content-Encoding": "gzip"}
    # peer hop: through node 1, built by node 3's engine
    async with session.post(f"{replay_swarm.node(1).agent_url}/v1.41/build?t={tag}&rm=1", headers=headers,
                            data=gzip.compress(build_context("peer")), ssl=insecure_context()) as r:
        out = (await r.read()).decode(errors="replace")
        assert r.status == 200 and "errorDetail" not in out, out
    try:
        assert node3.cli("run", "--rm", tag, "cat", "/marker").stdout == "peer"
    finally:
        node3.cli("rmi", "-f", tag, check=False)
    # fan-out: the encoded body reaches every node as it was sent (a decoded body under the caller's
    # Content-Encoding would be refused by the peers, and they would be missing from the answer)
    body = gzip.compress(b'{"filler": "' + b"x" * 4096 + b'"}')
    async with session.get(f"{replay_swarm.node(2).agent_url}/v1.41/containers/json?all=1", data=body,
                            ssl=insecure_context(), headers={**replay_swarm.signer.headers(),
                                                             "Content-Type": "application/json",
                                                             "Content-Encoding": "gzip"}) as r:
        assert r.status == 200 and "X-Keelson-Failed-Nodes" not in r.headers, await r.text()
        names = {i["Portainer"]["Agent"]["NodeName"] for i in await r.json()}
    assert names == {n.name for n in replay_swarm}
