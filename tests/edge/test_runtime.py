"""EdgeRuntime key lookup in a cluster (GET /key from a member tagged EdgeKeySet, POST /key to the others)
and the association page's own rules, in-process with a scripted membership and peer agents on loopback."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.cluster.membership import Member, StaticMembership
from agent.config import Config
from agent.engine import EngineInfo
from edge.key import EdgeKeyError, KeyAlreadySetError
from edge.runtime import EdgeRuntime
from edge.ui import AssociationUI
from tests.edge.conftest import eventually, free_port
from tests.edge.portainer_standin import PortainerStandin, raw_b64

pytestmark = pytest.mark.edge

FP = "4tX1GnHG1HFaWbkbLa8Oq8hvNGkgcnRx8uCRSi1gZTk="
KEY = raw_b64(f"http://127.0.0.1:1|127.0.0.1:2|{FP}|7".encode())


@dataclass
class TaggingMembership(StaticMembership):
    tags: dict[str, str] = field(default_factory=dict)

    async def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


@dataclass
class FakeState:
    """The parts of agent.state.AgentState that EdgeRuntime reads."""

    config: Config
    membership: TaggingMembership
    info: EngineInfo = field(default_factory=lambda: EngineInfo(node_name="n1"))
    advertise_addr: str = "127.0.0.1"
    docker: Any = None

    def members(self) -> list[Member]:
        return self.membership.members()


@dataclass
class Peer:
    member: Member
    received: list[dict[str, Any]]
    key: str = ""
    """What its GET /key hands over ("" = 404, no key)."""


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    """Two peer agents: n2 has the key (GET /key), n3 has none (records POST /key)."""
    made: list[Peer] = []
    runners: list[web.AppRunner] = []
    for name, key_text in (("n2", KEY), ("n3", "")):
        peer = Peer(Member(name, "127.0.0.1", 0, edge_key_set=bool(key_text)), [], key_text)

        async def key(request: web.Request, peer: Peer = peer) -> web.Response:
            if request.method == "GET":
                if not peer.key:
                    return web.json_response({"message": "No key associated to this agent"}, status=404)
                return web.json_response({"key": peer.key})
            peer.received.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/key", key)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        peer.member = Member(name, "127.0.0.1", runner.addresses[0][1], edge_key_set=bool(key_text))
        made.append(peer)
    try:
        yield made
    finally:
        for runner in runners:
            await runner.cleanup()


def state_with(tmp_path: Path, members: list[Member], **config: Any) -> FakeState:
    me = Member("n1", "127.0.0.1", 9001)
    return FakeState(Config(edge=True, data_path=tmp_path, edge_id="edge-rt", **config),
                     TaggingMembership([me, *members]))


async def test_key_from_a_cluster_member(tmp_path: Path, peers: list[Peer]) -> None:
    state = state_with(tmp_path, [p.member for p in peers])
    runtime = await EdgeRuntime.create(state)  # type: ignore[arg-type]
    try:
        assert runtime.key is not None and runtime.key.endpoint_id == 7
        assert runtime.key_source == "cluster member n2"
        assert (tmp_path / "agent_edge_key").read_text() == KEY
        assert stat.S_IMODE(os.stat(tmp_path / "agent_edge_key").st_mode) == 0o600
        assert state.membership.tags == {"EdgeKeySet": "set"}
        assert peers[1].received == []  # a key that came from the cluster is not pushed back
    finally:
        await runtime.close()


async def test_env_key_wins_and_a_bad_file_stops_start(tmp_path: Path, peers: list[Peer]) -> None:
    other = raw_b64(f"http://127.0.0.1:1|127.0.0.1:2|{FP}|9".encode())
    (tmp_path / "agent_edge_key").write_text("garbage")
    runtime = await EdgeRuntime.create(state_with(tmp_path, [], edge_key=other))  # type: ignore[arg-type]
    assert runtime.key is not None and runtime.key.endpoint_id == 9
    assert (tmp_path / "agent_edge_key").read_text() == other
    await runtime.close()
    (tmp_path / "agent_edge_key").write_text("garbage")
    with pytest.raises(EdgeKeyError, match="fix or remove the file"):
        await EdgeRuntime.create(state_with(tmp_path, []))  # type: ignore[arg-type]


async def test_a_key_set_here_is_offered_to_members_without_one(tmp_path: Path, peers: list[Peer]) -> None:
    state = state_with(tmp_path, [peers[1].member])  # only n3, which has no key
    runtime = await EdgeRuntime.create(state)  # type: ignore[arg-type]
    try:
        assert runtime.key is None
        with pytest.raises(EdgeKeyError):
            await runtime.set_key("bm90IGEga2V5", "POST /key")
        await runtime.set_key(KEY, "POST /key")
        with pytest.raises(KeyAlreadySetError):
            await runtime.set_key(KEY, "POST /key")
        await eventually(lambda: peers[1].received == [{"Key": KEY}])
        assert state.membership.tags == {"EdgeKeySet": "set"}
    finally:
        await runtime.close()


async def test_waiting_agent_takes_the_key_when_a_member_gets_one(tmp_path: Path, peers: list[Peer]) -> None:
    portainer = PortainerStandin(None)
    await portainer.start()
    portainer.add_endpoint(7, checked_in=True)
    ui_port = free_port()
    state = state_with(tmp_path, [peers[1].member], edge_server_host="127.0.0.1", edge_server_port=ui_port,
                       edge_tunnel=False)
    runtime = await EdgeRuntime.create(state)  # type: ignore[arg-type]
    try:
        await runtime.start()
        assert runtime.key is None and runtime.ui is not None and runtime.ui.running
        peers[0].key = portainer.key_for(7, fingerprint=FP, tunnel_addr="127.0.0.1:2")
        state.membership.replace([*state.membership.members(), peers[0].member])  # n2 joins with a key
        await eventually(lambda: runtime.key is not None, timeout=5)
        assert runtime.key_source == "cluster member n2"
        ui = runtime.ui
        await eventually(lambda: not ui.running, timeout=5)
        await eventually(lambda: len(portainer.polls_for(7)) >= 1, timeout=5)  # services started
    finally:
        await runtime.close()
        await portainer.stop()


async def test_association_page_rules() -> None:
    taken: list[str] = []

    async def on_key(text: str) -> None:
        if text.strip() == "bad":
            raise EdgeKeyError("invalid Edge key: not base64 text")
        taken.append(text)

    ui = AssociationUI("127.0.0.1", 0, on_key, timeout=30)
    await ui.start()
    base = f"http://127.0.0.1:{ui.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as resp:
            assert resp.status == 200
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert 'action="/init"' in await resp.text()
        async with http.post(base + "/init", data={"key": ""}) as resp:
            assert resp.status == 400 and "Missing key parameter" in await resp.text()
        async with http.post(base + "/init", data={"key": "bad"}) as resp:
            body = await resp.text()
            assert resp.status == 400 and "invalid Edge key: not base64 text" in body and 'id="error"' in body
        async with http.post(base + "/init", data={"key": "<b>x</b>"}) as resp:
            assert resp.status == 200 and "Agent setup OK. You can close this page." in await resp.text()
    await asyncio.wait_for(ui.wait_closed(), 5)
    assert taken == ["<b>x</b>"]
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http, http.get(base + "/"):
            pass


async def test_association_page_closes_when_unused() -> None:
    async def on_key(_text: str) -> None:
        raise AssertionError("no key expected")

    ui = AssociationUI("127.0.0.1", 0, on_key, timeout=0.3)
    await ui.start()
    await asyncio.wait_for(ui.wait_closed(), 5)
    assert not ui.running
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{ui.port}/"):
            pass

