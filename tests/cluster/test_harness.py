"""The namespace Swarm harness itself (tools/swarm/), on real dockerds in real network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.signer import Signer
from tools.swarm import REPO_ROOT, SwarmCluster, SwarmError, ping, root_can_connect, tcp_reachable

pytestmark = pytest.mark.cluster

FAKE_AGENT = Path(__file__).with_name("fake_agent.py")


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def dockerd_pids(cluster: SwarmCluster) -> list[int]:
    return [int(n.engine.pidfile.read_text()) for n in cluster if n.engine.pidfile.exists()]


def leftovers(cluster: SwarmCluster, pids: list[int]) -> list[str]:
    """Whatever of this cluster still exists on the machine, the given processes included."""
    found = cluster.leftovers() + [f"process {pid}" for pid in pids if alive(pid)]
    found += [f"file {p}" for p in [cluster.state_file, cluster.nodes_tsv] if p.exists()]
    return found


# ---------------------------------------------------------------------- the session swarm


def test_names_fit_the_kernel_and_carry_the_run_id(swarm: SwarmCluster) -> None:
    names = [swarm.bridge, *(n.netns for n in swarm), *(n.veth for n in swarm)]
    assert all(len(name) <= 15 and swarm.run_id in name for name in names), names
    assert len(set(names)) == len(names)
    assert [n.name for n in swarm] == ["node1", "node2", "node3"]
    assert swarm.subnet is not None and swarm.subnet.prefixlen == 24 and swarm.subnet.is_private
    assert [n.ip for n in swarm] == [str(swarm.subnet.network_address + i) for i in (11, 12, 13)]


def test_three_nodes_ready_with_distinct_hostnames_node1_manager(swarm: SwarmCluster) -> None:
    out = swarm.manager.cli("node", "ls", "--format",
                            "{{.Hostname}}\t{{.Status}}\t{{.Availability}}\t{{.ManagerStatus}}").stdout
    rows = {r.split("\t")[0]: r.split("\t")[1:] for r in out.splitlines() if r.strip()}
    assert set(rows) == {"node1", "node2", "node3"}
    assert all(status == "Ready" and avail == "Active" for status, avail, _ in rows.values()), rows
    assert rows["node1"][2] == "Leader"
    assert rows["node2"][2] == rows["node3"][2] == ""
    for node in swarm:
        info = json.loads(node.cli("info", "--format", "{{json .}}").stdout)
        assert info["Name"] == node.name
        assert info["Swarm"]["LocalNodeState"] == "active"
        assert info["Swarm"]["NodeAddr"] == node.ip
        assert info["Swarm"]["ControlAvailable"] is (node.index == 1)
        assert "busybox:local" in node.cli("images", "--format", "{{.Repository}}:{{.Tag}}").stdout


def test_global_service_runs_on_every_node(swarm: SwarmCluster) -> None:
    name = f"harness-{uuid.uuid4().hex[:8]}"
    manager = swarm.manager
    manager.cli("service", "create", "--detach", "--mode", "global", "--name", name, "busybox:local",
                "sleep", "3600")
    try:
        def running_on() -> set[str]:
            out = manager.cli("service", "ps", name, "--filter", "desired-state=running", "--format",
                              "{{.Node}}\t{{.CurrentState}}").stdout
            return {line.split("\t")[0] for line in out.splitlines() if "\tRunning" in line}

        wait_until(lambda: running_on() == {"node1", "node2", "node3"}, 180, f"{name} Running on every node")
        for node in swarm:
            local = node.cli("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}").stdout
            assert local.split(), f"no task container of {name} on {node.name}"
    finally:
        manager.cli("service", "rm", name, check=False)


def test_each_engine_only_through_its_own_socket(swarm: SwarmCluster) -> None:
    assert len({str(n.socket) for n in swarm}) == 3
    node_ids = set()
    for node in swarm:
        assert node.socket.is_socket() and node.socket.is_relative_to(node.dir)
        info = json.loads(node.cli("info", "--format", "{{json .}}").stdout)
        assert info["Name"] == node.name
        node_ids.add(info["Swarm"]["NodeID"])
        pid = int(node.engine.pidfile.read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        hosts = [args[i + 1] for i, arg in enumerate(args) if arg in ("-H", "--host")]
        assert hosts == [node.docker_host]
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(node.netns_path).st_ino}]"
        for port in (2375, 2376):
            assert not root_can_connect(node.ip, port)
            assert not tcp_reachable(node, "127.0.0.1", port)
    assert len(node_ids) == 3


def test_link_down_cuts_node3_off_and_link_up_restores_it(swarm: SwarmCluster) -> None:
    n1, n2, n3 = swarm.node(1), swarm.node(2), swarm.node(3)
    assert ping(n1, n3.ip)
    assert tcp_reachable(n1, n3.ip, 7946)
    swarm.link_down(3)
    try:
        assert not ping(n1, n3.ip)
        assert not tcp_reachable(n1, n3.ip, 7946)
        assert not root_can_connect(n3.ip, 7946)
        assert ping(n1, n2.ip)
        assert tcp_reachable(n1, n2.ip, 7946)
    finally:
        swarm.link_up(3)
    wait_until(lambda: ping(n1, n3.ip), 15, "node3 answering pings again")
    assert tcp_reachable(n1, n3.ip, 7946)
    assert root_can_connect(n3.ip, 7946)

    def node3_ready() -> bool:
        out = swarm.manager.cli("node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout
        return "node3 Ready" in out

    wait_until(node3_ready, 60, "node3 Ready again")


def test_nodes_tsv_state_and_docker_config(swarm: SwarmCluster) -> None:
    lines = swarm.nodes_tsv.read_text().splitlines()
    assert lines[0] == "name\tip\tagent_port\tdocker_socket"
    rows = [line.split("\t") for line in lines[1:]]
    assert rows == [[n.name, n.ip, "9001", str(n.socket)] for n in swarm]
    loaded = SwarmCluster.load(swarm.state_dir)
    assert loaded.run_id == swarm.run_id and loaded.bridge == swarm.bridge and loaded.subnet == swarm.subnet
    assert [(n.name, n.ip, n.netns, n.veth, n.socket) for n in loaded] == \
        [(n.name, n.ip, n.netns, n.veth, n.socket) for n in swarm]
    assert loaded.signer.public_key_hex == swarm.signer.public_key_hex
    config = json.loads((swarm.docker_config / "config.json").read_text())
    assert config["HttpHeaders"]["X-PortainerAgent-PublicKey"] == swarm.signer.public_key_hex


def test_node_indexes_are_one_based(swarm: SwarmCluster) -> None:
    assert swarm.node(1) is swarm.manager
    with pytest.raises(IndexError):
        swarm.node(0)
    with pytest.raises(IndexError):
        swarm.node(4)


# ---------------------------------------------------------------------- clusters of their own


def test_agent_plumbing_with_a_fake_agent(tmp_path: Path) -> None:
    """start_agents, wait_agents, stop_agent, start_agent with tests/cluster/fake_agent.py as the agent."""
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_AGENT}" "$@"\n')
    wrapper.chmod(0o755)
    cluster = SwarmCluster(tmp_path / "st", nodes=2)
    with cluster:
        cluster.start_agents(env={"FAKE_AGENT_NODES": "node1,node2"}, python=str(wrapper))
        answers = cluster.wait_agents(timeout=30)
        assert {n: sorted(a["NodeName"] for a in agents) for n, agents in answers.items()} == \
            {"node1": ["node1", "node2"], "node2": ["node1", "node2"]}
        records = {}
        for node in cluster:
            rec = json.loads((node.data_path / "fake-agent.json").read_text())
            records[node.index] = rec
            assert rec["argv"][1:] == ["-m", "agent"]
            assert rec["cwd"] == str(REPO_ROOT)
            assert rec["pid"] == node.agent_pid
            assert rec["netns"] == f"net:[{os.stat(node.netns_path).st_ino}]"
            env = rec["env"]
            assert env["DOCKER_HOST"] == f"unix://{node.socket}"
            assert env["AGENT_PORT"] == "9001"
            assert env["AGENT_CLUSTER_ADDR"] == ",".join(n.ip for n in cluster)  # like tasks.<service>
            assert env["KEELSON_ADVERTISE_ADDR"] == node.ip
            assert env["DATA_PATH"] == str(node.dir / "data")
            assert env["LOG_LEVEL"] == "DEBUG"
            assert "fake agent listening" in node.agent_log.read_text()
        state = json.loads(cluster.state_file.read_text())
        assert [n["agent_pid"] for n in state["nodes"]] == [records[1]["pid"], records[2]["pid"]]

        # The agent pinned the cluster's key: another one is refused.
        status, _, _ = cluster.agent_request(1, "GET", "/agents", headers=Signer().headers())
        assert status == 403

        # A crash (SIGKILL) of node 2's agent takes its child along; a restart comes back on the same key.
        cluster.stop_agent(2, signal.SIGKILL)
        assert not alive(records[2]["pid"]) and not alive(records[2]["child"])
        assert not root_can_connect(cluster.node(2).ip, 9001)
        with pytest.raises(SwarmError):
            cluster.wait_agents(timeout=1)
        cluster.start_agent(2)
        assert cluster.node(2).agent_pid != records[2]["pid"]
        cluster.wait_agents(timeout=30)
        with pytest.raises(SwarmError, match="already running"):
            cluster.start_agent(2)

        # Another process (here: another object loaded from the state) stops them by PID, children included.
        records[2] = json.loads((cluster.node(2).data_path / "fake-agent.json").read_text())
        SwarmCluster.load(cluster.state_dir).stop_agents()
        for rec in records.values():
            assert not alive(rec["pid"]) and not alive(rec["child"])

        # Teardown also stops what an agent started outside its session (by the node's namespace).
        cluster.start_agents(env={"FAKE_AGENT_NODES": "node1,node2", "FAKE_AGENT_DETACHED_CHILD": "1"},
                             python=str(wrapper))
        cluster.wait_agents(timeout=30)
        pids = dockerd_pids(cluster)
        for node in cluster:
            rec = json.loads((node.data_path / "fake-agent.json").read_text())
            assert rec["detached"] and alive(rec["detached"])
            pids += [rec["pid"], rec["child"], rec["detached"]]
    assert leftovers(cluster, pids) == []


def test_cli_up_and_down_from_other_processes_leave_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "st"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.swarm", *args, "--state-dir", str(state_dir)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    up = cli("up", "--nodes", "2")
    assert up.returncode == 0, up.stderr
    cluster = SwarmCluster.load(state_dir)
    try:
        lines = (state_dir / "nodes.tsv").read_text().splitlines()
        assert lines[0] == "name\tip\tagent_port\tdocker_socket"
        assert [line.split("\t")[0] for line in lines[1:]] == ["node1", "node2"]
        # Something for teardown to stop: a service task on each node and a plain container.
        cluster.manager.cli("service", "create", "--detach", "--mode", "global", "--name", "g",
                            "busybox:local", "sleep", "3600")
        cluster.node(2).cli("run", "-d", "busybox:local", "sleep", "3600")
        wait_until(lambda: all(len(n.cli("ps", "-q").stdout.split()) >= 1 for n in cluster)
                   and len(cluster.node(2).cli("ps", "-q").stdout.split()) == 2, 60, "containers running")
        pids = dockerd_pids(cluster)
        assert len(pids) == 2
        assert cli("up", "--nodes", "2").returncode != 0  # one cluster per state dir
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert leftovers(cluster, pids) == []
    again = cli("down")
    assert again.returncode == 0 and "no cluster" in again.stdout


def test_a_failed_build_removes_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def fail(self: SwarmCluster, deadline: float) -> None:
        seen.extend(dockerd_pids(self))
        raise SwarmError("injected failure")

    monkeypatch.setattr(SwarmCluster, "_wait_ready", fail)
    cluster = SwarmCluster(tmp_path / "st", nodes=2)
    with pytest.raises(SwarmError, match="injected failure"):
        cluster.up()
    assert len(seen) == 2
    assert leftovers(cluster, seen) == []
    cluster.down()  # idempotent
    assert not (tmp_path / "st").exists()
