"""The cluster through real agents on the namespace Swarm: fan-out, manager operations, node targets, faults.

Every assertion is about what a user sees (Docker CLI output, JSON, headers); waits are bounded polls, never
assertions on speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.dockerd import DOCKER_CLI
from tools.procs import alive, descendants, proc_stat
from tools.swarm import SwarmCluster

FANOUT_DEADLINE = "2s"
AGENT_ENV = {"KEELSON_FANOUT_TIMEOUT": FANOUT_DEADLINE}


def wait_until(check: Callable[[], Any], timeout: float = 90.0, what: str = "condition",
               tolerate: tuple[type[Exception], ...] = (OSError, ValueError)) -> Any:
    """Poll `check` until it returns something true; `tolerate` are errors taken for "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


@pytest.fixture(scope="module")
def cluster(swarm: SwarmCluster) -> Iterator[SwarmCluster]:
    """The session Swarm with one agent process per node (each on its node's network namespace)."""
    swarm.signer.write_docker_config(swarm.docker_config)
    swarm.start_agents(env=AGENT_ENV)
    try:
        swarm.wait_agents(120)
        yield swarm
    finally:
        swarm.stop_agents()


def cli_config(cluster: SwarmCluster, tmp: Path, **headers: str) -> Path:
    return cluster.signer.write_docker_config(tmp / uuid.uuid4().hex[:6], extra=headers)


def docker(cluster: SwarmCluster, node: int, *args: str, config: Path | None = None, input: bytes | None = None,
           check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """The real Docker CLI against node N's agent, from the root namespace over the bridge."""
    cfg = config or cluster.docker_config
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_CERT_PATH": str(cfg), "HOME": str(cfg)}
    res = subprocess.run([DOCKER_CLI, "--config", str(cfg), "--tls", "-H", f"tcp://{cluster.node(node).ip}:9001",
                          *args], input=input, capture_output=True, timeout=timeout, env=env, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} on node{node}: {res.stderr.decode()}")
    return res


def api(cluster: SwarmCluster, node: int, path: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    status, hdrs, body = cluster.agent_request(node, "GET", path, headers=headers, timeout=15)
    return status, hdrs, json.loads(body) if body else None


@pytest.fixture(scope="module")
def containers(cluster: SwarmCluster) -> Iterator[dict[str, str]]:
    """One container per node, created directly on each node's engine: name -> node name."""
    made = {}
    for node in cluster:
        name = f"c-{node.name}-{uuid.uuid4().hex[:4]}"
        node.cli("run", "-d", "--name", name, "busybox:local", "sleep", "3600")
        made[name] = node.name
    yield made
    for name, node_name in made.items():
        next(n for n in cluster if n.name == node_name).cli("rm", "-f", name, check=False)


def test_agents_lists_every_member_with_roles(cluster: SwarmCluster) -> None:
    for node in cluster:
        status, _, agents = api(cluster, node.index, "/v2/agents")
        assert status == 200
        by_name = {a["NodeName"]: a for a in agents}
        assert set(by_name) == {n.name for n in cluster}
        assert by_name[cluster.manager.name]["NodeRole"] == "manager"
        for n in list(cluster)[1:]:
            assert by_name[n.name] == {"IPAddress": n.ip, "Port": "9001", "NodeName": n.name,
                                       "NodeRole": "worker", "EdgeKeySet": False}


def test_docker_ps_through_a_worker_shows_every_node(cluster: SwarmCluster, containers: dict[str, str]) -> None:
    out = docker(cluster, 3, "ps", "-a", "--format", "{{.Names}}").stdout.decode().split()
    assert set(containers) <= set(out)
    status, headers, items = api(cluster, 2, "/v1.41/containers/json?all=1")
    assert status == 200 and "X-Keelson-Failed-Nodes" not in headers
    seen = {i["Names"][0].lstrip("/"): i["Portainer"]["Agent"]["NodeName"] for i in items}
    for name, node_name in containers.items():
        assert seen[name] == node_name


def test_images_volumes_networks_are_merged_without_dedup(cluster: SwarmCluster) -> None:
    _, _, images = api(cluster, 1, "/images/json")
    busy = [i for i in images if "busybox:local" in (i.get("RepoTags") or [])]
    assert sorted(i["Portainer"]["Agent"]["NodeName"] for i in busy) == sorted(n.name for n in cluster)
    vol = f"v{uuid.uuid4().hex[:6]}"
    cluster.node(3).cli("volume", "create", vol)
    try:
        status, _, volumes = api(cluster, 2, "/volumes")
        assert status == 200 and set(volumes) >= {"Volumes", "Warnings"}
        mine = [v for v in volumes["Volumes"] if v["Name"] == vol]
        assert [v["Portainer"]["Agent"]["NodeName"] for v in mine] == [cluster.node(3).name]
        assert vol in docker(cluster, 1, "volume", "ls", "-q").stdout.decode().split()
    finally:
        cluster.node(3).cli("volume", "rm", vol)
    _, _, networks = api(cluster, 3, "/networks")
    assert {n["Portainer"]["Agent"]["NodeName"] for n in networks if n["Name"] == "bridge"} == \
        {n.name for n in cluster}


def test_manager_operations_through_a_worker(cluster: SwarmCluster) -> None:
    nodes = docker(cluster, 3, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}").stdout.decode()
    assert sorted(line.split()[0] for line in nodes.splitlines()) == sorted(n.name for n in cluster)
    assert f"{cluster.manager.name} Leader" in nodes
    svc = f"s{uuid.uuid4().hex[:6]}"
    docker(cluster, 2, "service", "create", "-q", "--name", svc, "busybox:local", "sleep", "3600")
    try:
        listed = docker(cluster, 3, "service", "ls", "--format", "{{.Name}}").stdout.decode().split()
        assert svc in listed
        assert docker(cluster, 2, "service", "inspect", svc).returncode == 0
    finally:
        docker(cluster, 3, "service", "rm", svc)
    assert svc not in docker(cluster, 2, "service", "ls", "--format", "{{.Name}}").stdout.decode().split()


def test_stack_deploy_through_a_worker_like_portainer(cluster: SwarmCluster, tmp_path: Path) -> None:
    """Portainer runs `docker stack deploy` with the ManagerOperation header in the CLI's config."""
    cfg = cli_config(cluster, tmp_path, **{"X-PortainerAgent-ManagerOperation": "1"})
    compose = tmp_path / "stack.yml"
    compose.write_text("version: '3.8'\nservices:\n  web:\n    image: busybox:local\n"
                       "    command: sleep 3600\n    networks: [back]\nnetworks:\n  back:\n    driver: overlay\n")
    stack = f"st{uuid.uuid4().hex[:5]}"
    docker(cluster, 3, "stack", "deploy", "-c", str(compose), stack, config=cfg)
    try:
        out = docker(cluster, 2, "stack", "services", stack, "--format", "{{.Name}}", config=cfg).stdout.decode()
        assert out.split() == [f"{stack}_web"]
        nets = docker(cluster, 2, "network", "ls", "--format", "{{.Name}}", config=cfg).stdout.decode().split()
        assert f"{stack}_back" in nets
    finally:
        docker(cluster, 3, "stack", "rm", stack, config=cfg)


def test_target_header_reaches_the_named_node(cluster: SwarmCluster, containers: dict[str, str],
                                              tmp_path: Path) -> None:
    on_node3 = next(name for name, node in containers.items() if node == cluster.node(3).name)
    cfg = cli_config(cluster, tmp_path, **{"X-PortainerAgent-Target": cluster.node(3).name})
    # logs and exec of a container that lives on node 3, through node 1's agent
    cluster.node(3).cli("exec", on_node3, "sh", "-c", "echo from-node3 > /proc/1/fd/1")
    assert b"from-node3" in docker(cluster, 1, "logs", on_node3, config=cfg).stdout
    res = docker(cluster, 1, "exec", on_node3, "sh", "-c", "echo exec-ok; exit 5", config=cfg, check=False)
    assert (res.returncode, res.stdout) == (5, b"exec-ok\n")
    # docker run on the remote node attaches, with stdin half-closed across two agents
    name = f"r{uuid.uuid4().hex[:6]}"
    res = docker(cluster, 1, "run", "-i", "--name", name, "busybox:local", "sh", "-c", "cat; echo done",
                 config=cfg, input=b"piped-remote\n", timeout=60)
    assert res.stdout == b"piped-remote\ndone\n"
    assert cluster.node(3).cli("inspect", name).returncode == 0  # it really ran on node 3
    assert cluster.node(1).cli("inspect", name, check=False).returncode != 0
    docker(cluster, 1, "rm", name, config=cfg)


def test_unknown_target_is_the_go_error(cluster: SwarmCluster) -> None:
    status, _, body = api(cluster, 2, "/containers/x/json", **{"X-PortainerAgent-Target": "ghost"})
    assert status == 500
    assert body == {"message": "The agent was unable to contact any other agent",
                    "details": "Unable to find the targeted agent"}


def _listing(cluster: SwarmCluster, node: int) -> tuple[set[str], dict[str, str]]:
    status, headers, items = api(cluster, node, "/containers/json?all=1")
    assert status == 200
    failed = json.loads(headers.get("X-Keelson-Failed-Nodes", "{}"))
    return {i["Portainer"]["Agent"]["NodeName"] for i in items}, failed


def _members(cluster: SwarmCluster, node: int) -> set[str]:
    status, _, agents = api(cluster, node, "/agents")
    return {a["NodeName"] for a in agents} if status == 200 else set()


def test_dead_agent_then_dead_network_do_not_break_listings(cluster: SwarmCluster,
                                                           containers: dict[str, str]) -> None:
    n3 = cluster.node(3).name
    everyone = {n.name for n in cluster}
    cluster.stop_agent(3)
    try:
        nodes, failed = _listing(cluster, 1)
        assert nodes == everyone - {n3}
        # until gossip notices, node 3 is still a member and must be named as failed
        assert failed == {} or set(failed) == {n3}
        # each agent's Serf notices on its own: node 2 is asked next, so it must have noticed too
        wait_until(lambda: n3 not in _members(cluster, 1) and n3 not in _members(cluster, 2),
                   what="node 3 dropped from membership")
        assert _listing(cluster, 2) == (everyone - {n3}, {})
    finally:
        cluster.start_agent(3)
    wait_until(lambda: _members(cluster, 1) == everyone and _members(cluster, 3) == everyone,
               what="node 3 back in membership")
    assert _listing(cluster, 1) == (everyone, {})

    cluster.link_down(3)
    try:
        nodes, failed = _listing(cluster, 1)
        assert nodes == everyone - {n3}
        if failed:  # still a member: it was asked and left out once the deadline passed
            assert set(failed) == {n3}
        wait_until(lambda: n3 not in _members(cluster, 2), what="blackholed node 3 dropped")
    finally:
        cluster.link_up(3)
    wait_until(lambda: all(_members(cluster, i) == everyone for i in (1, 2, 3)), timeout=120,
               what="node 3 rejoined after its network came back")
    assert _listing(cluster, 2) == (everyone, {})


def _serf_child(pid: int) -> int | None:
    """The agent's serf process (a child of its first worker), or None while there is none (being restarted)."""
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"serf"):
                return int(child)
        except OSError:
            continue
    return None


def test_killed_serf_child_is_recovered(cluster: SwarmCluster) -> None:
    agent_pid = cluster.node(2).agent_pid
    assert agent_pid is not None
    old = _serf_child(agent_pid)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (c := _serf_child(agent_pid)) != old and c, what="a new serf child")
    assert new != old
    everyone = {n.name for n in cluster}
    wait_until(lambda: _members(cluster, 2) == everyone and _members(cluster, 1) == everyone,
               what="membership complete after the serf restart")


def test_a_killed_primary_worker_comes_back_with_one_serf(cluster: SwarmCluster) -> None:
    """The worker that runs Serf killed outright (SIGKILL, the OOM killer): its serf goes with it, the
    supervisor starts the worker again, and the new serf (the only one) rejoins the cluster."""
    agent_pid = cluster.node(2).agent_pid
    assert agent_pid is not None
    old = _serf_child(agent_pid)
    assert old is not None
    stat = proc_stat(old)
    assert stat is not None
    primary = int(stat[1])  # the serf's parent: the primary worker
    assert primary != agent_pid
    os.kill(primary, signal.SIGKILL)
    wait_until(lambda: not alive(old), what="the killed worker's serf ends with it")
    new = wait_until(lambda: (c := _serf_child(agent_pid)) not in (None, old) and c, what="a new serf child")
    everyone = {n.name for n in cluster}
    wait_until(lambda: _members(cluster, 2) == everyone and _members(cluster, 1) == everyone,
               what="membership complete after the worker's restart")
    serfs = [p for p in descendants(agent_pid) if (proc_stat(p) or ["", ""])[1] != str(agent_pid)]
    assert serfs == [new], "one serf per node"


async def test_console_websocket_to_a_container_on_another_node(cluster: SwarmCluster,
                                                              containers: dict[str, str]) -> None:
    """Portainer's console reaches a container on node 3 through node 1's agent (WebSocket forwarded)."""
    import aiohttp

    from tools.agentproc import insecure_context

    on_node3 = next(name for name, node in containers.items() if node == cluster.node(3).name)
    headers = {**cluster.headers(), "X-PortainerAgent-Target": cluster.node(3).name}
    base = f"https://{cluster.node(1).ip}:9001"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/containers/{on_node3}/exec", headers=headers, ssl=insecure_context(),
                          json={"AttachStdin": True, "AttachStdout": True, "Tty": True, "Cmd": ["sh"]}) as r:
            assert r.status == 201
            exec_id = (await r.json())["Id"]
        async with s.ws_connect(f"{base}/websocket/exec?id={exec_id}&nodeName={cluster.node(3).name}",
                                headers=headers, ssl=insecure_context()) as ws:
            await ws.send_str("echo remote-$((40+2)); exit\n")
            text = ""
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                text += msg.data
    assert "remote-42" in text
