"""One node of the namespace Swarm: a network namespace with its own dockerd (and, once started, its agent)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.dockerd import PrivateDockerd, run
from tools.swarm.base import AGENT_PORT, DOCKERD_ARGS, DOCKERD_ENV


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


def local_state(node: SwarmNode) -> str:
    res = node.cli("info", "--format", "{{.Swarm.LocalNodeState}}", check=False, timeout=30)
    return res.stdout.strip()
