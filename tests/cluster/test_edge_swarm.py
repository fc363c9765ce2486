"""Edge mode on the namespace Swarm: only the leader polls, and it deploys an Edge stack with `docker stack`."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.edge.portainer_standin import PortainerStandin
from tools.swarm import SwarmCluster

pytestmark = [pytest.mark.cluster, pytest.mark.edge]

ACK, DEPLOYING, RECEIVED, RUNNING, REMOVING, REMOVED, ERROR = 3, 8, 1, 7, 9, 4, 2
COMPOSE = """\
version: "3.8"
services:
  app:
    image: busybox:local
    command: ["sleep", "3600"]
"""


async def until(predicate: object, timeout: float, what: str, swarm: SwarmCluster) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            logs = "\n".join(f"--- {n.name}\n{n.agent_log.read_text(errors='replace')[-2500:]}" for n in swarm)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        await asyncio.sleep(0.5)


def services(swarm: SwarmCluster, project: str) -> list[dict[str, str]]:
    out = swarm.node(1).cli("service", "ls", "--filter", f"label=com.docker.stack.namespace={project}",
                            "--format", "{{json .}}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def test_only_the_leader_polls_and_deploys_the_stack(swarm: SwarmCluster) -> None:
    assert swarm.subnet is not None
    host = str(next(swarm.subnet.hosts()))  # the bridge's own address: every namespace reaches it
    portainer = PortainerStandin(checkin=1, host=host)
    await portainer.start()
    portainer.add_endpoint(41, checked_in=True)
    portainer.add_stack(1, "swarmweb", COMPOSE, [41])
    fingerprint = base64.b64encode(bytes(32)).decode()  # no tunnel here (EDGE_TUNNEL=false)
    key = portainer.key_for(41, fingerprint=fingerprint, tunnel_addr=f"{host}:1")
    env = {"EDGE": "1", "EDGE_KEY": key, "EDGE_ID": "kls-swarm-edge", "EDGE_TUNNEL": "false",
           "KEELSON_EDGE_POLL_INTERVAL": "1s", "KEELSON_EDGE_JOB_RUNNER": "container"}
    await asyncio.to_thread(swarm.start_agents, env)
    leader = await asyncio.to_thread(swarm.leader)
    try:
        def reports() -> list[int]:
            return portainer.reports(1, 41)

        await until(lambda: reports()[-1:] in ([RUNNING], [ERROR]), 180, "the stack deployed", swarm)
        assert reports() == [ACK, DEPLOYING, RECEIVED, RUNNING], portainer.report_errors(1, 41)
        [service] = services(swarm, "edge_swarmweb")
        assert service["Name"] == "edge_swarmweb_app" and service["Replicas"] == "1/1"
        assert {p.peer for p in portainer.polls_for(41)} == {leader.ip}, "workers do not poll"
        for node in swarm:
            if node is not leader:
                assert "Edge stack" not in node.agent_log.read_text(errors="replace")

        portainer.unassign_stack(1, 41)
        await until(lambda: reports()[-2:] == [REMOVING, REMOVED], 120, "the stack removed", swarm)
        await until(lambda: not services(swarm, "edge_swarmweb"), 60, "no service left", swarm)
    finally:
        await asyncio.to_thread(swarm.stop_agents)
        await portainer.stop()
        swarm.node(1).cli("stack", "rm", "edge_swarmweb", check=False)
