"""The namespace Swarm's life cycle: build, state file, load, tear down, roles, faults (see tools/swarm)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tools.dockerd import BUSYBOX, new_run_id, run
from tools.procs import cmdline, cmdline_mentions, pids_mentioning, read_pid
from tools.signer import Signer
from tools.swarm.agents import AgentProcesses
from tools.swarm.base import (
    _LONGEST_SOCKET_SUFFIX,
    AGENT_PORT,
    MAX_NODES,
    STATE_VERSION,
    SwarmError,
    parallel,
    sh,
    wait_for,
)
from tools.swarm.net import (
    del_link,
    del_netns,
    free_subnet,
    kill_netns_processes,
    ping,
    remove_tree,
    root_networks,
    umount_below,
)
from tools.swarm.node import SwarmNode, local_state


class SwarmCluster(AgentProcesses):
    """N nodes (default 3) of a real Docker Swarm, each in its own network namespace.

    `up()` builds it (and removes everything again if that fails), `down()` removes it (idempotent).
    `SwarmCluster.load(state_dir)` attaches to a cluster built by another process.
    """

    def __init__(self, state_dir: Path | str, nodes: int = 3, run_id: str | None = None,
                 agent_port: int = AGENT_PORT, signer: Signer | None = None, managers: int = 1) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}")
        if not 1 <= managers <= nodes:
            raise ValueError("managers must be between 1 and the number of nodes")
        self.managers = managers
        """Nodes 1..managers are managers (node 1 the first leader), the others workers."""
        self._cuts: list[tuple[int, int]] = []
        self.state_dir = Path(state_dir).resolve()
        self.run_id = run_id or new_run_id()
        self.size = nodes
        self.agent_port = agent_port
        self.bridge = f"kls{self.run_id}b"
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[SwarmNode] = []
        # The agent pins the first key that signs a request: one Signer for the whole cluster.
        self.signer = signer or Signer()
        self.agent_env: dict[str, str] = {}
        self.agent_python: str = sys.executable
        self.timings: dict[str, float] = {}
        # What exists (recorded before/as it is made, so that down() removes exactly that).
        self._created: dict[str, Any] = _nothing_created()
        self.status = "new"
        self._save_lock = threading.Lock()

    # ------------------------------------------------------------------ public helpers

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def nodes_tsv(self) -> Path:
        return self.state_dir / "nodes.tsv"

    @property
    def docker_config(self) -> Path:
        """Docker CLI config dir with the signature headers: `docker --config D --tls -H tcp://IP:9001 ps`."""
        return self.state_dir / "docker-config"

    @property
    def manager(self) -> SwarmNode:
        return self.node(1)

    def node(self, i: int) -> SwarmNode:
        """Node i, 1-based (node(1) is the manager)."""
        if not 1 <= i <= len(self.nodes):
            raise IndexError(f"node index {i} out of 1..{len(self.nodes)} (indexes are 1-based)")
        return self.nodes[i - 1]

    def __iter__(self) -> Iterator[SwarmNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __enter__(self) -> SwarmCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def headers(self) -> dict[str, str]:
        """Fresh signature headers of this cluster's one Signer."""
        return self.signer.headers()

    # ------------------------------------------------------------------ build

    def up(self, timeout: float = 240.0) -> SwarmCluster:
        """Build the cluster; on any failure (Ctrl-C included) remove what was made and re-raise."""
        if self.state_file.exists():
            raise SwarmError(f"{self.state_file} exists: a cluster (or its leftovers) is there; run down")
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._build(deadline)
        except BaseException:
            self.status = "failed"
            with contextlib.suppress(Exception):
                self._save()
            try:
                self.down()
            except Exception as exc:  # report both, the build error first
                print(f"tools.swarm: teardown after a failed build also failed: {exc}", file=sys.stderr)
            raise
        self.timings["up"] = time.monotonic() - started
        self.status = "up"
        self._save()
        return self

    def _build(self, deadline: float) -> None:
        if shutil.which("dockerd") is None:
            raise SwarmError("dockerd is missing (apt-get install -y docker.io)")
        if not BUSYBOX.exists():
            raise SwarmError(f"{BUSYBOX} is missing (apt-get install -y busybox-static)")
        self.nodes, self.subnet = [], None
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True)
            self._created["state_dir"] = True
        nodes_dir = self.state_dir
        if len(str(nodes_dir / f"node{self.size}" / "dockerd")) + _LONGEST_SOCKET_SUFFIX > 107:
            # dockerd's unix sockets would not fit (107 bytes): the nodes go to a short directory instead.
            nodes_dir = Path(f"/tmp/kls{self.run_id}")
            self._created["nodes_dir"] = str(nodes_dir)
        self._save()
        t = time.monotonic()

        self._make_bridge()
        assert self.subnet is not None
        hosts = list(self.subnet.hosts())
        for i in range(1, self.size + 1):
            ip = str(hosts[9 + i])  # .11, .12, ...
            bip = f"172.30.{i}.1/24"
            if ipaddress.ip_network(bip, strict=False).overlaps(self.subnet):
                raise SwarmError(f"--bip {bip} overlaps the node subnet {self.subnet}")
            self.nodes.append(SwarmNode(index=i, name=f"node{i}", ip=ip, netns=f"kls{self.run_id}n{i}",
                                        veth=f"kls{self.run_id}v{i}", dir=nodes_dir / f"node{i}",
                                        bip=bip, agent_port=self.agent_port))
        self._save()
        self._add_iptables_rule()
        for node in self.nodes:
            self._make_node_network(node)
        self.timings["network"] = time.monotonic() - t

        t = time.monotonic()
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            self._created["dockerds"].append(node.index)
        self._save()
        parallel([partial(self._start_engine, n, deadline) for n in self.nodes])
        self.timings["engines"] = time.monotonic() - t

        t = time.monotonic()
        manager = self.manager
        for node in self.nodes[1:]:
            wait_for(partial(ping, node, manager.ip), min(deadline, time.monotonic() + 30),
                     f"{node.name} cannot reach {manager.ip} over the bridge")
        manager.cli("swarm", "init", "--advertise-addr", manager.ip, timeout=60)
        token = manager.cli("swarm", "join-token", "-q", "worker").stdout.strip()
        parallel([partial(self._join, n, token, deadline) for n in self.nodes[1:]])
        self._wait_ready(deadline)
        if self.managers > 1:
            manager.cli("node", "promote", *[n.name for n in self.nodes[1:self.managers]], timeout=60)
            self.wait_roles({n.name: "manager" for n in self.nodes[:self.managers]}, deadline)
        self.timings["swarm"] = time.monotonic() - t

        self.signer.write_docker_config(self.docker_config)
        key = self.state_dir / "signer.pem"
        key.write_bytes(self.signer.key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        key.chmod(0o600)
        self._write_nodes_tsv()

    def _make_bridge(self) -> None:
        for _ in range(20):
            subnet = free_subnet()
            gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
            self._created["bridge"] = True
            self._save()
            sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            sh(["ip", "addr", "add", gateway, "dev", self.bridge])
            # Another run may have picked the same /24 at the same moment: then both pick again.
            if any(net.overlaps(subnet) for dev, net in root_networks() if dev != self.bridge):
                run(["ip", "link", "del", self.bridge], check=False)
                continue
            sh(["ip", "link", "set", self.bridge, "up"])
            self.subnet = subnet
            return
        raise SwarmError("found no free private /24 for the bridge")

    def _add_iptables_rule(self) -> None:
        # Bridged traffic goes through the root namespace's FORWARD chain (br_netfilter), whose policy dockerd
        # sets to DROP; without this, Swarm joins time out.
        self._created["iptables"] = True
        self._save()
        sh(["iptables", "-w", "30", "-I", "FORWARD", *self._rule()])

    def _rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    def _make_node_network(self, node: SwarmNode) -> None:
        self._created["netns"].append(node.netns)
        self._save()
        sh(["ip", "netns", "add", node.netns])
        sh(["ip", "-n", node.netns, "link", "set", "lo", "up"])
        self._created["veths"].append(node.veth)
        self._save()
        sh(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns])
        assert self.subnet is not None
        sh(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/{self.subnet.prefixlen}", "dev", "eth0"])
        sh(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
        sh(["ip", "link", "set", node.veth, "master", self.bridge])
        sh(["ip", "link", "set", node.veth, "up"])

    def _start_engine(self, node: SwarmNode, deadline: float) -> None:
        node.engine.start(timeout=max(10.0, min(90.0, deadline - time.monotonic())))
        node.engine.import_busybox()

    def _join(self, node: SwarmNode, token: str, deadline: float) -> None:
        """Join as a worker; a join that times out is abandoned (leave --force) and tried again."""
        last = ""
        while time.monotonic() < deadline:
            res = node.cli("swarm", "join", "--token", token, "--advertise-addr", node.ip,
                           f"{self.manager.ip}:2377", check=False, timeout=90)
            if res.returncode == 0:
                return
            last = (res.stderr or res.stdout).strip()
            # "Timeout was reached before node joined ... will continue in the background": give it a moment.
            with contextlib.suppress(SwarmError):
                wait_for(lambda: local_state(node) == "active", min(deadline, time.monotonic() + 5), "")
                return
            node.cli("swarm", "leave", "--force", check=False, timeout=60)
            time.sleep(1)
        raise SwarmError(f"{node.name} could not join the swarm: {last}")

    def _wait_ready(self, deadline: float) -> None:
        want = {n.name for n in self.nodes}

        def ready() -> bool:
            res = self.manager.cli("node", "ls", "--format", "{{.Hostname}} {{.Status}}", check=False,
                                   timeout=30)
            rows = [line.split() for line in res.stdout.splitlines() if line.strip()]
            return {r[0] for r in rows if len(r) >= 2 and r[1] == "Ready"} >= want

        wait_for(ready, deadline, f"not every node of {sorted(want)} became Ready")

    def _write_nodes_tsv(self) -> None:
        lines = ["name\tip\tagent_port\tdocker_socket"]
        lines += [f"{n.name}\t{n.ip}\t{n.agent_port}\t{n.socket}" for n in self.nodes]
        self.nodes_tsv.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        data = {
            "version": STATE_VERSION, "run_id": self.run_id, "status": self.status, "size": self.size,
            "state_dir": str(self.state_dir), "bridge": self.bridge,
            "subnet": str(self.subnet) if self.subnet else None, "agent_port": self.agent_port,
            "nodes": [n.to_state() for n in self.nodes], "created": self._created,
            "agent_env": self.agent_env, "agent_python": self.agent_python, "timings": self.timings,
        }
        with self._save_lock:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, state_dir: Path | str) -> SwarmCluster:
        """The cluster recorded in `<state_dir>/state.json` (built by this or another process)."""
        path = Path(state_dir).resolve() / "state.json"
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            raise SwarmError(f"{path}: unknown state version {data.get('version')}")
        signer = None
        key_file = path.parent / "signer.pem"
        if key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                signer = Signer(key)
        cluster = cls(path.parent, nodes=data["size"], run_id=data["run_id"],
                      agent_port=data.get("agent_port", AGENT_PORT), signer=signer)
        cluster.subnet = ipaddress.IPv4Network(data["subnet"]) if data.get("subnet") else None
        cluster.nodes = [SwarmNode.from_state(n) for n in data["nodes"]]
        cluster._created = data["created"]
        cluster.status = data.get("status", "unknown")
        cluster.agent_env = data.get("agent_env", {})
        cluster.agent_python = data.get("agent_python", sys.executable)
        cluster.timings = data.get("timings", {})
        return cluster

    # ------------------------------------------------------------------ teardown

    def down(self, keep_logs: bool = False) -> None:
        """Remove everything this cluster made: agents, dockerds (by PID), namespaces, veths, bridge, iptables
        rule, directories. Idempotent; every step runs even when an earlier one fails (errors raised at the
        end).
        keep_logs: first copy every agent.log and dockerd.log to `<state_dir>/logs/`.
        """
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        if keep_logs:
            step("keep logs", self._keep_logs)
        step("stop agents", self.stop_agents)
        engines = [n for n in self.nodes if n.index in self._created["dockerds"]]
        step("stop dockerds", partial(parallel, [partial(self._stop_engine, n) for n in engines]))
        for name in list(self._created["netns"]):
            # Anything still living on a node (an agent's child in a session of its own, say) was started
            # by this harness there: stop it by PID, else the namespace and its veth outlive `ip netns del`.
            step(f"stop what runs in {name}", partial(kill_netns_processes, name))
            step(f"delete namespace {name}", partial(del_netns, name))
        for name in list(self._created["veths"]):
            step(f"delete veth {name}", partial(del_link, name))
        if self._created["bridge"]:
            step(f"delete bridge {self.bridge}", partial(del_link, self.bridge))
        if self._created["iptables"]:
            step("delete iptables rule", self._del_iptables_rule)
        for node in self.nodes:
            step(f"remove {node.dir}", partial(remove_tree, node.dir))
        if self._created.get("nodes_dir"):
            nodes_dir = Path(self._created["nodes_dir"])
            step(f"remove {nodes_dir}", partial(remove_tree, nodes_dir))
        if not errors:
            errors = [f"left: {what}" for what in self.leftovers()]
        if errors:
            with contextlib.suppress(Exception):
                self._save()
            raise SwarmError("teardown incomplete: " + "; ".join(errors))
        for name in ("nodes.tsv", "signer.pem", "state.tmp"):
            (self.state_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.docker_config, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        if self._created["state_dir"]:
            with contextlib.suppress(OSError):
                self.state_dir.rmdir()  # only if empty (kept logs stay)
        self._created = _nothing_created()
        self.status = "down"

    def leftovers(self) -> list[str]:
        """What of this cluster exists on the machine: namespaces, links and the iptables rule named after its
        run id, processes and mounts below its directories, its node directories."""
        tag = f"kls{self.run_id}"
        found = [f"namespace {line.split()[0]}" for line in run(["ip", "netns", "list"], check=False)
                 .stdout.splitlines() if line.startswith(tag)]
        found += [f"link {line.split(':')[1].strip()}" for line in run(["ip", "-o", "link"], check=False)
                  .stdout.splitlines() if tag in line]
        found += [f"iptables rule {line}" for line in run(["iptables", "-w", "30", "-S", "FORWARD"], check=False)
                  .stdout.splitlines() if self.bridge in line.split()]
        prefixes = [str(n.dir) + "/" for n in self.nodes]
        if self._created.get("nodes_dir"):
            prefixes.append(self._created["nodes_dir"] + "/")
        for prefix in prefixes:
            found += [f"process {pid} {' '.join(cmdline(pid))[:100]}" for pid in pids_mentioning(prefix)]
        found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(tuple(prefixes))] if prefixes else []
        found += [f"directory {n.dir}" for n in self.nodes if n.dir.exists()]
        return sorted(set(found))

    def _keep_logs(self) -> None:
        logs = self.state_dir / "logs"
        for node in self.nodes:
            for src in (node.agent_log, node.engine.root / "dockerd.log"):
                if src.exists():
                    logs.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, logs / f"{node.name}-{src.name}")

    def _stop_engine(self, node: SwarmNode) -> None:
        engine = node.engine
        pid = read_pid(engine.pidfile)
        if pid is not None and not cmdline_mentions(pid, str(engine.root)):
            engine.pidfile.unlink(missing_ok=True)  # stale pidfile of a dead dockerd: never kill a reused PID
        # Swarm stops its tasks with their grace period (10 s) when dockerd stops: kill them first instead.
        if pid is not None and engine.socket.exists():
            with contextlib.suppress(Exception):
                ids = engine.cli("ps", "-q", check=False, timeout=10).stdout.split()
                if ids:
                    engine.cli("kill", *ids, check=False, timeout=20)
        engine.stop()
        # Whatever dockerd left behind (containerd, shims) names its root on the command line.
        prefix = str(engine.root) + "/"
        for pid in pids_mentioning(prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        umount_below(node.dir)

    def _del_iptables_rule(self) -> None:
        while run(["iptables", "-w", "30", "-C", "FORWARD", *self._rule()], check=False).returncode == 0:
            sh(["iptables", "-w", "30", "-D", "FORWARD", *self._rule()])

    # ------------------------------------------------------------------ agents

    def roles(self, via: int | None = None) -> dict[str, str]:
        """Node name -> `manager`/`worker` as a reachable manager's engine says (`docker node ls`)."""
        candidates = [via] if via is not None else [n.index for n in self.nodes]
        for i in candidates:
            res = self.node(i).cli("node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}", check=False,
                                   timeout=20)
            if res.returncode == 0:
                out: dict[str, str] = {}
                for line in res.stdout.splitlines():
                    parts = line.split()
                    if parts:
                        out[parts[0]] = "manager" if len(parts) > 1 else "worker"
                return out
        raise SwarmError("no manager answered `docker node ls`")

    def wait_roles(self, want: dict[str, str], deadline: float) -> None:
        wait_for(lambda: all(self.roles().get(k) == v for k, v in want.items()), deadline,
                 f"roles {want} not reached")

    def leader(self) -> SwarmNode:
        """The node whose engine is the Raft leader now."""
        for node in self.nodes:
            res = node.cli("node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}", check=False, timeout=20)
            if res.returncode == 0:
                for line in res.stdout.splitlines():
                    parts = line.split()
                    if len(parts) > 1 and parts[1] == "Leader":
                        return next(n for n in self.nodes if n.name == parts[0])
        raise SwarmError("no leader found")

    # ------------------------------------------------------------------ faults

    def link_down(self, i: int) -> None:
        """Cut node i (1-based) off the bridge: its namespace network disappears for every other node."""
        sh(["ip", "link", "set", self.node(i).veth, "down"])

    def link_up(self, i: int) -> None:
        sh(["ip", "link", "set", self.node(i).veth, "up"])

    def split(self, group: list[int]) -> None:
        """Partition the cluster: the nodes of `group` and the others no longer reach each other (both
        ways), while each side stays whole. The rules live in the nodes' own namespaces (gone with them)."""
        others = [n.index for n in self.nodes if n.index not in group]
        for a in group:
            for b in others:
                for x, y in ((a, b), (b, a)):
                    self._cut(x, y, "-I")
                    self._cuts.append((x, y))

    def heal(self) -> None:
        """Remove every cut made by split()."""
        cuts, self._cuts = self._cuts, []
        for x, y in cuts:
            self._cut(x, y, "-D")

    def _cut(self, x: int, y: int, action: str) -> None:
        """In node x's namespace, drop what arrives from node y. Only on arrival, as a real partition does:
        a DROP on the sender's OUTPUT fails its send locally (EPERM), which memberlist takes for its own
        fault and then never suspects the other node."""
        sh(["ip", "netns", "exec", self.node(x).netns, "iptables", "-w", "30", action, "INPUT", "-s",
            self.node(y).ip, "-j", "DROP"])


def _nothing_created() -> dict[str, Any]:
    return {"state_dir": False, "nodes_dir": None, "bridge": False, "iptables": False,
            "netns": [], "veths": [], "dockerds": []}
