"""The clean-up after an Edge update (UPDATE_ID), against the session's real dockerd."""

from __future__ import annotations

import json

import aiodocker
import pytest

from edge.updates import clean_after_update, split_agents
from tools.dockerd import PrivateDockerd

pytestmark = [pytest.mark.edge, pytest.mark.engine]


def test_split_agents() -> None:
    containers = [
        {"Id": "old", "Image": "portainer/agent:2.19.0", "Labels": {}},
        {"Id": "new", "Image": "keelson/agent:1", "Labels": {"io.portainer.agent": "true",
                                                             "io.portainer.update.scheduleId": "7"}},
        {"Id": "me", "Image": "keelson/agent:1", "Labels": {}},
        {"Id": "web", "Image": "nginx", "Labels": {}},
    ]
    old, new = split_agents(containers, 7, own_id="me")
    assert [c["Id"] for c in old] == ["old"] and new is not None and new["Id"] == "new"


async def test_new_agent_replaces_the_old_and_removes_the_updater(engine: PrivateDockerd, run_id: str) -> None:
    names = {"old": f"agent-{run_id}", "new": f"agent-{run_id}-update", "updater": f"portainer-updater-{run_id}",
             "other": f"web-{run_id}"}
    network = f"updater-net-{run_id}"
    engine.cli("network", "create", network)
    try:
        engine.cli("run", "-d", "--name", names["old"], "--label", "io.portainer.agent=true", "busybox:local",
                   "sleep", "600")
        engine.cli("run", "-d", "--name", names["new"], "--label", "io.portainer.agent=true", "--label",
                   "io.portainer.update.scheduleId=7", "busybox:local", "sleep", "600")
        engine.cli("run", "--name", names["updater"], "--network", network, "--label", "io.portainer.updater=true",
                   "busybox:local", "true")
        engine.cli("run", "-d", "--name", names["other"], "busybox:local", "sleep", "600")

        async with aiodocker.Docker(url=engine.host) as docker:
            await clean_after_update(docker, 7, tries=1)

        listed = {c["Names"]: c for c in map(json.loads, engine.cli(
            "ps", "-a", "--format", "{{json .}}").stdout.splitlines())}
        assert names["old"] in listed and "io.portainer.update.scheduleId=7" in listed[names["old"]]["Labels"], \
            "the new agent took the old one's name"
        assert names["new"] not in listed
        assert names["updater"] not in listed
        assert names["other"] in listed, "nothing but agents and updaters is touched"
        assert network not in engine.cli("network", "ls", "--format", "{{.Name}}").stdout.split()
    finally:
        for name in names.values():
            engine.cli("rm", "-f", name, check=False)
        engine.cli("network", "rm", network, check=False)
