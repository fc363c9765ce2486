"""Edge stacks end to end: the real agent, the Portainer stand-in, Docker Compose v2 and the session's dockerd."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.edge.conftest import EDGE_ID, AgentFactory, EdgeStand, agent_log, http_get, start_agent, wait_for
from tests.edge.portainer_standin import PortainerStandin
from tools.agentproc import AgentProcess
from tools.dockerd import PrivateDockerd

pytestmark = [pytest.mark.edge, pytest.mark.engine]

ACK, DEPLOYING, RECEIVED, ERROR, RUNNING, REMOVING, REMOVED = 3, 8, 1, 2, 7, 9, 4
DEPLOYED = [ACK, DEPLOYING, RECEIVED, RUNNING]


def compose(label: str, image: str = "busybox:local") -> str:
    return f"""\
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    labels:
      keelson.test.version: "{label}"
    environment:
      - GREETING=${{GREETING:-unset}}
      - EDGE_ID_SEEN=${{PORTAINER_EDGE_ID}}
"""


def containers(engine: PrivateDockerd, project: str) -> list[dict[str, Any]]:
    out = engine.cli("ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "--format",
                     "{{json .}}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def inspect(engine: PrivateDockerd, name: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(engine.cli("inspect", name).stdout)
    return data[0]


async def reports_reach(portainer: PortainerStandin, stack_id: int, endpoint_id: int, wanted: list[int],
                        proc: AgentProcess, timeout: float = 90.0, start: int = 0) -> None:
    """Wait until the reports (from index ``start``) end with ``wanted``; fail on an unexpected Error."""
    def done() -> bool:
        got = portainer.reports(stack_id, endpoint_id)[start:]
        if got[-1:] == [ERROR] and ERROR not in wanted:
            raise AssertionError(f"stack {stack_id} reported an error: {portainer.report_errors(stack_id, endpoint_id)}"
                                 f"\nagent log:\n{agent_log(proc)[-3000:]}")
        return got[-len(wanted):] == wanted

    await wait_for(done, timeout, f"stack {stack_id} reports {wanted} "
                   f"(so far {portainer.reports(stack_id, endpoint_id)[start:]})", proc)


def edge_env(portainer: PortainerStandin, endpoint_id: int, **extra: str) -> dict[str, str]:
    return {"EDGE_KEY": portainer.key_for(endpoint_id), "EDGE_TUNNEL": "false", **extra}


async def test_stack_deployed_redeployed_and_removed(stand: EdgeStand, edge_agents: AgentFactory,
                                                     engine: PrivateDockerd) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(21, checked_in=True)
    portainer.add_stack(1, "web", compose("one"), [21], env_file="GREETING=hello\n")
    proc = await start_agent(edge_agents(edge_env(portainer, 21)))

    await reports_reach(portainer, 1, 21, DEPLOYED, proc)
    assert portainer.reports(1, 21) == DEPLOYED, "Go's order, nothing else"
    assert portainer.stack_fetches[0] == (21, 1, "version=1")
    [first] = containers(engine, "edge_web")
    assert first["Names"] == "edge_web-app-1"
    details = inspect(engine, "edge_web-app-1")
    assert details["Config"]["Labels"]["keelson.test.version"] == "one"
    assert "GREETING=hello" in details["Config"]["Env"], "the .env beside the entry file is read by Compose"
    assert f"EDGE_ID_SEEN={EDGE_ID}" in details["Config"]["Env"], "PORTAINER_EDGE_ID reaches the project"
    files = proc.workdir / "data" / "edge_stacks" / "1"
    assert (files / "docker-compose.yml").read_text() == compose("one")

    # A new version: fetched again, redeployed (the container is replaced), the same reports again.
    mark = len(portainer.reports(1, 21))
    portainer.update_stack(1, compose("two"))
    await reports_reach(portainer, 1, 21, DEPLOYED, proc, start=mark)
    assert portainer.stack_fetches[-1] == (21, 1, "version=2")
    [second] = containers(engine, "edge_web")
    assert second["ID"] != first["ID"]
    assert inspect(engine, "edge_web-app-1")["Config"]["Labels"]["keelson.test.version"] == "two"

    # Dropped from the poll answer: removed, Removing then Removed, files gone.
    mark = len(portainer.reports(1, 21))
    portainer.unassign_stack(1, 21)
    await reports_reach(portainer, 1, 21, [REMOVING, REMOVED], proc, start=mark)
    assert containers(engine, "edge_web") == []
    assert not files.exists()


async def test_broken_compose_file_is_an_error_and_the_agent_goes_on(stand: EdgeStand, edge_agents: AgentFactory,
                                                                      engine: PrivateDockerd) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(22, checked_in=True)
    portainer.add_stack(2, "broken", "services:\n  app:\n    image: busybox:local\n    ports: [oops\n", [22])
    proc = await start_agent(edge_agents(edge_env(portainer, 22)))

    await reports_reach(portainer, 2, 22, [ACK, ERROR], proc)
    [error] = portainer.report_errors(2, 22)
    assert error.startswith("failed to validate stack: "), error
    assert "yaml" in error.lower() or "parse" in error.lower(), error
    assert "EDGE_STACK_FAILED" in agent_log(proc)
    assert "Traceback" not in agent_log(proc)
    got = await http_get(f"{proc.url}/ping")
    assert got is not None and got[0] == 204

    # Nothing is retried for an invalid file; a good stack beside it still deploys.
    portainer.add_stack(3, "fine", compose("ok"), [22])
    await reports_reach(portainer, 3, 22, DEPLOYED, proc)
    assert portainer.reports(2, 22) == [ACK, ERROR]
    assert containers(engine, "edge_broken") == []
    portainer.unassign_stack(3, 22)
    await reports_reach(portainer, 3, 22, [REMOVING, REMOVED], proc)


async def test_failed_deployment_is_retried_and_reported_each_time(stand: EdgeStand, edge_agents: AgentFactory,
                                                                   engine: PrivateDockerd) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(23, checked_in=True)
    missing = "keelson-test/not-here:1"  # no registry answers in the engine's namespace: the pull fails
    portainer.add_stack(4, "later", compose("x", image=missing), [23])
    proc = await start_agent(edge_agents(edge_env(portainer, 23, KEELSON_EDGE_STACK_RETRY="1s")))

    def attempts() -> int:
        return portainer.reports(4, 23).count(ERROR)

    await wait_for(lambda: attempts() >= 2, 90, "two failed attempts", proc)
    reports = portainer.reports(4, 23)
    assert reports[:3] == [ACK, DEPLOYING, ERROR] and reports[3] == DEPLOYING
    assert all(e.startswith("failed to redeploy stack: ") for e in portainer.report_errors(4, 23))

    # The image appears (as after a registry outage): the next attempt deploys, with no new version.
    engine.cli("tag", "busybox:local", missing)
    await wait_for(lambda: portainer.reports(4, 23)[-3:] == [DEPLOYING, RECEIVED, RUNNING], 90,
                   "a deployment after the image appeared", proc)
    assert [f for f in portainer.stack_fetches if f[1] == 4] == [(23, 4, "version=1")]
    portainer.unassign_stack(4, 23)
    await reports_reach(portainer, 4, 23, [REMOVING, REMOVED], proc)
    engine.cli("rmi", missing)


async def test_restart_keeps_what_runs_and_removes_what_was_dropped(stand: EdgeStand, edge_agents: AgentFactory,
                                                                    engine: PrivateDockerd) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(24, checked_in=True)
    portainer.add_stack(5, "keep", compose("k"), [24])
    portainer.add_stack(6, "drop", compose("d"), [24])
    proc = await start_agent(edge_agents(edge_env(portainer, 24)))
    await reports_reach(portainer, 5, 24, DEPLOYED, proc)
    await reports_reach(portainer, 6, 24, DEPLOYED, proc)
    [kept] = containers(engine, "edge_keep")
    fetches = len(portainer.stack_fetches)

    proc.stop()
    portainer.unassign_stack(6, 24)
    marks = {5: len(portainer.reports(5, 24)), 6: len(portainer.reports(6, 24))}
    polls = len(portainer.polls_for(24))
    await start_agent(proc)

    await reports_reach(portainer, 6, 24, [REMOVING, REMOVED], proc, start=marks[6])
    assert containers(engine, "edge_drop") == []
    await wait_for(lambda: len(portainer.polls_for(24)) >= polls + 3, 30, "three polls after the restart", proc)
    assert portainer.reports(5, 24)[marks[5]:] == [], "a stack running at its version is not redeployed"
    assert len(portainer.stack_fetches) == fetches
    [still] = containers(engine, "edge_keep")
    assert still["ID"] == kept["ID"]
    portainer.unassign_stack(5, 24)
    await reports_reach(portainer, 5, 24, [REMOVING, REMOVED], proc, start=marks[5])
