"""A real multi-node Docker Swarm on this machine, one network namespace per node (docs/cluster.md).

Used by the cluster tests, the benchmarks and `./dev.sh swarm up|down`:

    python -m tools.swarm up [--nodes N] [--agents] [--state-dir .swarm]
    python -m tools.swarm down [--state-dir .swarm]

Layout of one run (id = tools.dockerd.new_run_id()):
- a bridge `kls<id>b` in the root namespace with the .1 address of a free private /24 (10.100-254.x.0/24);
- per node i: namespace `kls<id>n<i>`, veth `kls<id>v<i>` (root side, on the bridge) whose peer is `eth0` in
  the namespace with address .(10+i); a private dockerd (tools.dockerd.PrivateDockerd) in that namespace with
  hostname `node<i>` (= its Swarm node name and the agent's NodeName) and `--bip 172.30.<i>.1/24`;
- `iptables -I FORWARD -i <bridge> -o <bridge> -j ACCEPT` in the root namespace;
- node 1 is the Swarm manager (leader), the others join as workers; busybox:local is imported on every node;
- per node a directory `<state_dir>/node<i>` (or `/tmp/kls<id>/node<i>` when the state dir is too long for
  dockerd's unix sockets) with `dockerd/` (its root: docker.sock, dockerd.log), `data/` (the agent's
  DATA_PATH) and `agent.log`;
- `<state_dir>/nodes.tsv` (name, ip, agent_port, docker_socket; manager first), `<state_dir>/docker-config/`
  (Docker CLI config with the signature headers) and `<state_dir>/signer.pem` (the key of the one Signer that
  every user of the cluster must share, since the agent pins the first key).

Everything created is recorded in `<state_dir>/state.json` as soon as it exists, so that `down` (from another
process too) removes exactly that, also after a failure half-way. Processes are only ever stopped by PID.
Node indexes are 1-based everywhere (node 1 = `node1` = the manager).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tools.dockerd import BUSYBOX, PrivateDockerd, new_run_id, run
from tools.procs import (
    alive,
    cmdline,
    cmdline_mentions,
    pids_in_netns,
    pids_mentioning,
    read_pid,
    session_members,
    start_time,
)
from tools.signer import Signer

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_PORT = 9001
STATE_VERSION = 1
MAX_NODES = 50
# Unix socket paths are limited to 107 bytes; the longest one dockerd makes below its root is about this long.
_LONGEST_SOCKET_SUFFIX = len("/exec/containerd/containerd.sock.ttrpc")
# No registry is reachable: with this, a Swarm task uses the local image without trying a pull first (the
# namespaces have no default route, so a pull fails at once anyway; this only makes it deterministic).
DOCKERD_ENV = {"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
# Containers get 3 s (not 10-15 s) to stop when their dockerd stops, so that teardown is quick.
DOCKERD_ARGS = ("--shutdown-timeout", "3")

T = TypeVar("T")


class SwarmError(RuntimeError):
    """Building, using or removing the namespace Swarm failed."""


@dataclass
class SwarmNode:
    """One node: a network namespace with its own dockerd (and, once started, its agent)."""

    index: int
    name: str
    ip: str
    netns: str
    veth: str
    dir: Path
    bip: str
    agent_port: int = AGENT_PORT
    engine: PrivateDockerd = field(init=False)
    agent_proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    agent_pid: int | None = None
    agent_start_time: int | None = None

    def __post_init__(self) -> None:
        self.engine = PrivateDockerd(root=self.dir / "dockerd", netns=self.netns, hostname=self.name,
                                     bip=self.bip, env=dict(DOCKERD_ENV), extra_args=list(DOCKERD_ARGS))

    @property
    def socket(self) -> Path:
        """The node's Docker socket (reachable from the root namespace: it is a file)."""
        return self.engine.socket

    @property
    def docker_host(self) -> str:
        return self.engine.host

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def agent_url(self) -> str:
        return f"https://{self.ip}:{self.agent_port}"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    @property
    def data_path(self) -> Path:
        return self.dir / "data"

    def cli(self, *args: str, check: bool = True, input: str | bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The Docker CLI against this node's engine directly."""
        return self.engine.cli(*args, check=check, input=input, timeout=timeout)

    def nsexec(self, *cmd: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command on this node's network (not `ip netns exec`: see docs/cluster.md)."""
        return run(["nsenter", f"--net={self.netns_path}", *cmd], check=check, timeout=timeout)

    def to_state(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "ip": self.ip, "netns": self.netns, "veth": self.veth,
            "dir": str(self.dir), "bip": self.bip, "agent_port": self.agent_port,
            "agent_pid": self.agent_pid, "agent_start_time": self.agent_start_time,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> SwarmNode:
        node = cls(index=data["index"], name=data["name"], ip=data["ip"], netns=data["netns"],
                   veth=data["veth"], dir=Path(data["dir"]), bip=data["bip"],
                   agent_port=data.get("agent_port", AGENT_PORT))
        node.agent_pid = data.get("agent_pid")
        node.agent_start_time = data.get("agent_start_time")
        return node


class SwarmCluster:
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
        _parallel([partial(self._start_engine, n, deadline) for n in self.nodes])
        self.timings["engines"] = time.monotonic() - t

        t = time.monotonic()
        manager = self.manager
        for node in self.nodes[1:]:
            _wait_for(partial(ping, node, manager.ip), min(deadline, time.monotonic() + 30),
                      f"{node.name} cannot reach {manager.ip} over the bridge")
        manager.cli("swarm", "init", "--advertise-addr", manager.ip, timeout=60)
        token = manager.cli("swarm", "join-token", "-q", "worker").stdout.strip()
        _parallel([partial(self._join, n, token, deadline) for n in self.nodes[1:]])
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
            subnet = _free_subnet()
            gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
            self._created["bridge"] = True
            self._save()
            sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            sh(["ip", "addr", "add", gateway, "dev", self.bridge])
            # Another run may have picked the same /24 at the same moment: then both pick again.
            if any(net.overlaps(subnet) for dev, net in _root_networks() if dev != self.bridge):
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
                _wait_for(lambda: _local_state(node) == "active", min(deadline, time.monotonic() + 5), "")
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

        _wait_for(ready, deadline, f"not every node of {sorted(want)} became Ready")

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
        step("stop dockerds", partial(_parallel, [partial(self._stop_engine, n) for n in engines]))
        for name in list(self._created["netns"]):
            # Anything still living on a node (an agent's child in a session of its own, say) was started
            # by this harness there: stop it by PID, else the namespace and its veth outlive `ip netns del`.
            step(f"stop what runs in {name}", partial(_kill_netns_processes, name))
            step(f"delete namespace {name}", partial(_del_netns, name))
        for name in list(self._created["veths"]):
            step(f"delete veth {name}", partial(_del_link, name))
        if self._created["bridge"]:
            step(f"delete bridge {self.bridge}", partial(_del_link, self.bridge))
        if self._created["iptables"]:
            step("delete iptables rule", self._del_iptables_rule)
        for node in self.nodes:
            step(f"remove {node.dir}", partial(_remove_tree, node.dir))
        if self._created.get("nodes_dir"):
            nodes_dir = Path(self._created["nodes_dir"])
            step(f"remove {nodes_dir}", partial(_remove_tree, nodes_dir))
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
        _umount_below(node.dir)

    def _del_iptables_rule(self) -> None:
        while run(["iptables", "-w", "30", "-C", "FORWARD", *self._rule()], check=False).returncode == 0:
            sh(["iptables", "-w", "30", "-D", "FORWARD", *self._rule()])

    # ------------------------------------------------------------------ agents

    def start_agents(self, env: dict[str, str] | None = None, python: str = sys.executable) -> None:
        """Start `python -m agent` on every node, on the node's network; see start_agent."""
        self.agent_env = dict(env or {})
        self.agent_python = python
        for node in self.nodes:
            self.start_agent(node.index)

    def start_agent(self, i: int, env: dict[str, str] | None = None, python: str | None = None) -> None:
        """Start the agent of node i (1-based) with the env and python of the last start_agents (or these)."""
        node = self.node(i)
        if self._agent_alive(node):
            raise SwarmError(f"the agent of {node.name} is already running (PID {node.agent_pid})")
        node.data_path.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            "DOCKER_HOST": node.docker_host,
            "AGENT_PORT": str(node.agent_port),
            # every node's address, as `tasks.<service>` gives every task's in a deployed stack
            "AGENT_CLUSTER_ADDR": ",".join(n.ip for n in self.nodes),
            "KEELSON_ADVERTISE_ADDR": node.ip,
            "DATA_PATH": str(node.data_path),
            "LOG_LEVEL": "DEBUG",
            # The agent shares the node's network namespace with dockerd, whose Swarm gossip owns 7946.
            "KEELSON_SERF_PORT": "7947",
            **self.agent_env,
            **(env or {}),
        }
        cmd = ["nsenter", f"--net={node.netns_path}", python or self.agent_python, "-m", "agent"]
        with open(node.agent_log, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node.agent_proc = proc
        node.agent_pid = proc.pid
        node.agent_start_time = start_time(proc.pid)
        self._save()

    def stop_agent(self, i: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the agent of node i (1-based): `sig` to it (SIGKILL = crash), SIGKILL after `timeout`, then
        SIGKILL to whatever it started (its serf child) in its process group."""
        self._stop_agent_proc(self.node(i), sig, timeout)

    def stop_agents(self) -> None:
        """Stop every agent (in parallel), as stop_agent does."""
        _parallel([partial(self._stop_agent_proc, n, signal.SIGTERM, 10.0) for n in self.nodes])

    def _agent_alive(self, node: SwarmNode) -> bool:
        pid = node.agent_pid
        return pid is not None and alive(pid) and start_time(pid) == node.agent_start_time

    def _stop_agent_proc(self, node: SwarmNode, sig: signal.Signals, timeout: float) -> None:
        pid = node.agent_pid
        if pid is None:
            return
        ours = self._agent_alive(node)
        if ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            _wait_for(lambda: not self._agent_alive(node), time.monotonic() + timeout, "", raise_=False)
            if self._agent_alive(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # What it started (its serf child) stays in its session. The kernel hands out no PID that is still
        # a session id, so while such members live the number is ours; a living PID that started at another
        # time is not.
        if ours or not alive(pid):
            for child in session_members(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        if node.agent_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.agent_proc.wait(timeout=5)
            node.agent_proc = None
        if ours or not alive(pid):
            _wait_for(lambda: not alive(pid) and not session_members(pid), time.monotonic() + 5, "",
                      raise_=False)
        node.agent_pid = None
        node.agent_start_time = None
        if self.state_file.exists():
            self._save()

    def agent_request(self, i: int, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 5.0,
                      signed: bool = True) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request to node i's agent (TLS not verified, signed by the cluster's Signer)."""
        node = self.node(i)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(node.ip, node.agent_port, timeout=timeout, context=ctx)
        try:
            hdrs = {**(self.headers() if signed else {}), **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k: v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def wait_agents(self, timeout: float = 90.0) -> dict[str, list[dict[str, Any]]]:
        """Poll `GET /agents` on every node until each lists all N NodeNames; returns the answers by node."""
        want = {n.name for n in self.nodes}
        answers: dict[str, list[dict[str, Any]]] = {}
        last: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.name in answers:
                    continue
                if node.agent_pid is not None and not self._agent_alive(node):
                    raise SwarmError(f"the agent of {node.name} exited; {node.agent_log}:\n"
                                     f"{_tail(node.agent_log)}")
                try:
                    status, _, body = self.agent_request(node.index, "GET", "/agents", timeout=3)
                    if status != 200:
                        last[node.name] = f"HTTP {status}: {body[:200]!r}"
                        continue
                    agents = json.loads(body)
                    names = {a.get("NodeName") for a in agents if isinstance(a, dict)}
                    if names == want:
                        answers[node.name] = agents
                    else:
                        last[node.name] = f"lists {sorted(str(n) for n in names)}"
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    last[node.name] = f"{type(exc).__name__}: {exc}"
            if len(answers) == len(self.nodes):
                return answers
            if time.monotonic() > deadline:
                detail = "; ".join(f"{k}: {v}" for k, v in sorted(last.items()) if k not in answers)
                raise SwarmError(f"agents not all answering with {sorted(want)} after {timeout}s: {detail}")
            time.sleep(0.5)

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
        _wait_for(lambda: all(self.roles().get(k) == v for k, v in want.items()), deadline,
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


# ---------------------------------------------------------------------- helpers


def _nothing_created() -> dict[str, Any]:
    return {"state_dir": False, "nodes_dir": None, "bridge": False, "iptables": False,
            "netns": [], "veths": [], "dockerds": []}


def _parallel(fns: list[Callable[[], T]]) -> list[T]:
    """Run the callables in threads; every one finishes, then the first error (if any) is raised."""
    if not fns:
        return []
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]


def _wait_for(pred: Callable[[], bool], deadline: float, message: str, raise_: bool = True,
              interval: float = 0.3) -> bool:
    while True:
        try:
            if pred():
                return True
        except (OSError, subprocess.SubprocessError, RuntimeError):
            pass
        if time.monotonic() >= deadline:
            if raise_:
                raise SwarmError(message or "timed out")
            return False
        time.sleep(interval)


def _local_state(node: SwarmNode) -> str:
    res = node.cli("info", "--format", "{{.Swarm.LocalNodeState}}", check=False, timeout=30)
    return res.stdout.strip()


def _root_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(device, network) of every IPv4 address and route of the root namespace."""
    nets: list[tuple[str, ipaddress.IPv4Network]] = []
    for line in sh(["ip", "-o", "-4", "addr"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append((parts[1], ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network))
    for line in run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        parts = line.split()
        dst = parts[1] if parts and parts[0] in ("local", "broadcast", "unicast") and len(parts) > 1 else (
            parts[0] if parts else "")
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        with contextlib.suppress(ValueError):
            if dst != "default":
                nets.append((dev, ipaddress.IPv4Network(dst, strict=False)))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 of 10.100.0.0-10.254.255.0 that no address or route of this machine overlaps.

    Kept away from 10.0.x (Swarm's default overlay pool) and 172.17-31 (dockerd's bridge pools, --bip)."""
    used = [net for _, net in _root_networks()]
    for _ in range(500):
        cand = ipaddress.IPv4Network(f"10.{random.randint(100, 254)}.{random.randint(0, 255)}.0/24")
        if not any(cand.overlaps(u) for u in used if u.prefixlen > 0):
            return cand
    raise SwarmError("found no free private /24")


def sh(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command; failure raises SwarmError with its stderr."""
    try:
        return run(cmd, check=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        raise SwarmError(f"{' '.join(cmd)} failed ({exc.returncode}): {(exc.stderr or '').strip()}") from None
    except subprocess.TimeoutExpired:
        raise SwarmError(f"{' '.join(cmd)} did not finish within {timeout}s") from None


def _link_exists(name: str) -> bool:
    return run(["ip", "link", "show", name], check=False).returncode == 0


def _del_link(name: str) -> None:
    """Delete a link; one that vanished meanwhile is fine (a veth goes with its peer's namespace, asynchronously)."""
    if not _link_exists(name):
        return
    res = run(["ip", "link", "del", name], check=False)
    if res.returncode != 0 and _link_exists(name):
        raise SwarmError(f"ip link del {name} failed ({res.returncode}): {res.stderr.strip()}")


def _del_netns(name: str) -> None:
    if Path(f"/var/run/netns/{name}").exists():
        sh(["ip", "netns", "del", name])


def _kill_netns_processes(name: str, timeout: float = 10.0) -> None:
    path = Path(f"/var/run/netns/{name}")
    try:
        ns = f"net:[{path.stat().st_ino}]"
    except OSError:
        return
    pids = pids_in_netns(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not _wait_for(lambda: not pids_in_netns(ns), time.monotonic() + timeout, "", raise_=False):
        raise SwarmError(f"processes {pids_in_netns(ns)} in namespace {name} do not die")




def _umount_below(path: Path) -> None:
    prefix = str(path) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(prefix)]
    for mount in sorted(mounts, key=len, reverse=True):
        run(["umount", "-l", mount], check=False)


def _remove_tree(path: Path) -> None:
    _umount_below(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise SwarmError(f"could not remove {path}")


















def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ping(node: SwarmNode, ip: str) -> bool:
    """Whether `ip` answers one ICMP echo (1 s) from node's network namespace."""
    return node.nsexec("busybox", "ping", "-c1", "-W1", ip, timeout=10).returncode == 0


def tcp_reachable(node: SwarmNode, ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether `ip:port` accepts a TCP connection from node's network namespace."""
    code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
    res = node.nsexec(sys.executable, "-c", code, ip, str(port), str(timeout), timeout=timeout + 10)
    return res.returncode == 0


def root_can_connect(ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether `ip:port` accepts a TCP connection from the root namespace."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = SwarmCluster(args.state_dir, nodes=args.nodes, managers=args.managers)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        cluster.up()
    except KeyboardInterrupt:
        print("tools.swarm up: interrupted; everything made was removed", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # SwarmError, and PrivateDockerd's errors
        print(f"tools.swarm up: {exc}; everything made was removed", file=sys.stderr)
        return 1
    if args.agents:
        try:
            cluster.start_agents()
            cluster.wait_agents(timeout=args.agent_timeout)
        except BaseException as exc:
            for node in cluster.nodes:
                print(f"--- {node.agent_log}\n{_tail(node.agent_log)}", file=sys.stderr)
            cluster.down(keep_logs=True)
            print(f"tools.swarm up: agents did not come up ({exc}); cluster removed, logs in "
                  f"{cluster.state_dir / 'logs'}", file=sys.stderr)
            return 1
    print(f"swarm of {len(cluster)} nodes up in {time.monotonic() - started:.1f}s (run {cluster.run_id}, "
          f"bridge {cluster.bridge}, subnet {cluster.subnet})")
    print(cluster.nodes_tsv.read_text(), end="")
    print(f"docker -H {cluster.manager.docker_host} node ls")
    print(f"docker --config {cluster.docker_config} --tls -H tcp://{cluster.manager.ip}:{AGENT_PORT} ps")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    if not (state_dir / "state.json").exists():
        print(f"tools.swarm down: no cluster recorded in {state_dir}")
        return 0
    cluster = SwarmCluster.load(state_dir)
    try:
        cluster.down()
    except SwarmError as exc:
        print(f"tools.swarm down: {exc}", file=sys.stderr)
        return 1
    print(f"swarm {cluster.run_id} removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.swarm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the namespace Swarm (and optionally start the agents)")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--managers", type=int, default=1, help="nodes 1..N are managers (default 1)")
    up.add_argument("--agents", action="store_true", help="also start an agent per node and wait for them")
    up.add_argument("--agent-timeout", type=float, default=90.0)
    up.add_argument("--state-dir", default=".swarm")
    down = sub.add_parser("down", help="remove the namespace Swarm recorded in the state dir")
    down.add_argument("--state-dir", default=".swarm")
    args = parser.parse_args(argv)
    return _cmd_up(args) if args.command == "up" else _cmd_down(args)


if __name__ == "__main__":
    sys.exit(main())
