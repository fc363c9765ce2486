"""The agent image deployed with `docker stack deploy -c docker-compose.swarm.yml` on a real namespace Swarm.

The tests run in file order on one deployed stack: the last one takes a node out of the Swarm.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.deploy import (
    DEFAULT_STACK,
    DeployError,
    agent_containers,
    agents_seen,
    deploy_stack,
    diagnose,
    docker,
    load_image,
    remove_stack,
    service_name,
    wait_agents,
    wait_running,
    wait_until,
)
from tools.dockerd import DOCKER_CLI
from tools.image import BuiltImage
from tools.swarm import SwarmCluster, SwarmNode

pytestmark = pytest.mark.cluster

STACK = DEFAULT_STACK
SERVICE = service_name(STACK)
NETWORK = f"{STACK}_agent_network"
PROBE_LABEL = "keelson.test=deploy-probe"


@pytest.fixture(scope="module")
def stack(deploy_swarm: SwarmCluster, agent_image: BuiltImage) -> Iterator[SwarmCluster]:
    """The stack deployed and formed into one cluster; removed at the end (every container and network)."""
    cluster = deploy_swarm
    try:
        load_image(cluster, agent_image)
        deploy_stack(cluster, agent_image.build_tag, STACK)
        wait_running(cluster, cluster.nodes, STACK, timeout=180)
        wait_agents(cluster, cluster.nodes, STACK, timeout=120)
    except DeployError as exc:
        remove_stack(cluster, STACK)
        pytest.fail(f"the stack did not come up: {exc}")
    try:
        yield cluster
    finally:
        remove_stack(cluster, STACK)


@pytest.fixture(scope="module")
def cli_config(deploy_swarm: SwarmCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Docker CLI config carrying the cluster signer's signature headers (and the ca.pem `--tls` loads)."""
    return deploy_swarm.signer.write_docker_config(tmp_path_factory.mktemp("cli"))


def cli(config: Path, node: SwarmNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The real Docker CLI through the port the node publishes for its agent (host mode, not ingress)."""
    env = {**os.environ, "DOCKER_CERT_PATH": str(config)}
    env.pop("DOCKER_HOST", None)
    res = subprocess.run([DOCKER_CLI, "--config", str(config), "--tls", "-H", f"tcp://{node.ip}:9001", *args],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode == 0, f"docker {' '.join(args)} via {node.name}: {res.stderr.strip()}"
    return res


def engine_names(node: SwarmNode) -> set[str]:
    """Names of the containers running on one node, asked of its engine directly."""
    return set(docker(node, "ps", "--format", "{{.Names}}").stdout.split())


def overlay_ip(node: SwarmNode, container: str) -> str:
    nets = json.loads(docker(node, "inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout)
    return str(nets[NETWORK]["IPAddress"])


def agents_by_ip(cluster: SwarmCluster, node: SwarmNode) -> dict[str, str]:
    status, _, body = cluster.agent_request(node.index, "GET", "/agents", timeout=5)
    assert status == 200, body
    return {a["NodeName"]: a["IPAddress"] for a in json.loads(body)}


def test_docker_cli_through_any_node_lists_every_nodes_containers(stack: SwarmCluster, cli_config: Path) -> None:
    probes = {}
    try:
        for node in stack.nodes:
            name = f"probe-{node.name}"
            docker(node, "run", "-d", "--name", name, "--label", PROBE_LABEL, "busybox:local", "sleep", "600")
            probes[node.name] = name
        everything = set().union(*(engine_names(node) for node in stack.nodes))
        assert set(probes.values()) <= everything
        agents = [c for c in everything if c.startswith(f"{SERVICE}.")]
        assert len(agents) == len(stack.nodes), f"one agent container per node, got {sorted(agents)}"
        for node in stack.nodes:
            listed = cli(cli_config, node, "ps", "--format", "{{.Names}}").stdout.split()
            assert sorted(listed) == sorted(everything), f"through {node.name}"
            # A node operation is served by that node's own engine; /info is a manager operation (as in Go).
            assert cli(cli_config, node, "inspect", "--format", "{{.Name}}", probes[node.name]).stdout.strip() \
                == f"/{probes[node.name]}"
            assert cli(cli_config, node, "info", "--format", "{{.Name}}").stdout.strip() == stack.manager.name
    finally:
        for node in stack.nodes:
            ids = docker(node, "ps", "-aq", "--filter", f"label={PROBE_LABEL}", check=False).stdout.split()
            if ids:
                docker(node, "rm", "-f", *ids, check=False)


def test_volume_browsing_through_another_node(stack: SwarmCluster) -> None:
    """The volumes folder is bound at its own path, so the agent finds a volume at its real Mountpoint."""
    worker = stack.node(2)
    docker(worker, "volume", "create", "deploy-probe")
    try:
        docker(worker, "run", "--rm", "-v", "deploy-probe:/v", "busybox:local", "sh", "-c", "echo hello > /v/a.txt")
        target = {"X-PortainerAgent-Target": worker.name}
        status, _, body = stack.agent_request(1, "GET", "/browse/ls?volumeID=deploy-probe&path=/", headers=target)
        assert status == 200, body
        assert [entry["Name"] for entry in json.loads(body)] == ["a.txt"]
        status, _, body = stack.agent_request(1, "GET", "/browse/get?volumeID=deploy-probe&path=/a.txt",
                                              headers=target)
        assert (status, body) == (200, b"hello\n")
    finally:
        docker(worker, "volume", "rm", "-f", "deploy-probe", check=False)


def test_healthcheck_reports_the_agent_healthy(stack: SwarmCluster) -> None:
    for node in stack.nodes:
        container = agent_containers(node, STACK)[0]
        res = docker(node, "exec", container, "/opt/keelson/bin/python", "/opt/keelson/healthcheck.py", check=False)
        assert res.returncode == 0 and "204" in res.stdout, f"{node.name}: {res.stdout}{res.stderr}"
        # Swarm counts a task as running only once it is healthy; the container says so too.
        health = docker(node, "inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()
        assert health == "healthy", f"{node.name}: {health}"


def test_rolling_restart_leaves_one_whole_cluster(stack: SwarmCluster) -> None:
    cluster = stack
    before = {node.name: set(agent_containers(node, STACK)) for node in cluster.nodes}
    docker(cluster.manager, "service", "update", "-d", "--force", SERVICE)

    def update_state() -> str:
        state = docker(cluster.manager, "service", "inspect", "--format", "{{.UpdateStatus.State}}", SERVICE,
                       check=False).stdout.strip()
        return "" if state == "completed" else f"UpdateStatus {state!r}"

    try:
        wait_until(update_state, 300, "docker service update --force", on_timeout=lambda: diagnose(cluster, STACK))
        wait_running(cluster, cluster.nodes, STACK, timeout=60)
        after = {node.name: agent_containers(node, STACK) for node in cluster.nodes}
        for name, ids in after.items():
            assert len(ids) == 1 and ids[0] not in before[name], f"{name}: not replaced ({before[name]} -> {ids})"
        wait_agents(cluster, cluster.nodes, STACK, timeout=90)
    except DeployError as exc:
        pytest.fail(str(exc))
    # Every agent lists the new containers' addresses: nobody keeps a stale member of the old generation.
    want = {node.name: overlay_ip(node, after[node.name][0]) for node in cluster.nodes}
    for node in cluster.nodes:
        assert agents_by_ip(cluster, node) == want, f"through {node.name}"


def test_node_leaving_the_swarm_drops_from_agents(stack: SwarmCluster, cli_config: Path) -> None:
    cluster = stack
    gone, staying = cluster.node(3), [cluster.node(1), cluster.node(2)]
    docker(gone, "swarm", "leave")

    def down() -> str:
        rows = docker(cluster.manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout.splitlines()
        return "" if f"{gone.name} Down" in rows else f"nodes {rows}"

    try:
        wait_until(down, 60, f"{gone.name} Down on the manager")
        docker(cluster.manager, "node", "rm", gone.name)
        wait_agents(cluster, staying, STACK, timeout=60)
    except DeployError as exc:
        pytest.fail(str(exc))
    remaining = engine_names(staying[0]) | engine_names(staying[1])
    for node in staying:
        assert agents_seen(cluster, node) == {n.name for n in staying}
        # The cluster listing now asks only the nodes that are left, and none of them fails.
        assert sorted(cli(cli_config, node, "ps", "--format", "{{.Names}}").stdout.split()) == sorted(remaining)
        status, headers, _ = cluster.agent_request(node.index, "GET", "/containers/json", timeout=10)
        assert status == 200
        assert "x-keelson-failed-nodes" not in {k.lower() for k in headers}, headers
