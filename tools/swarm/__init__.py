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

Modules: `base` (constants, SwarmError, helpers), `net` (bridge, veths, namespaces, probes), `node`
(SwarmNode), `agents` (agent processes), `cluster` (SwarmCluster: life cycle, state, roles, faults),
`__main__` (the CLI).
"""

from tools.swarm.base import AGENT_PORT, REPO_ROOT, SwarmError, sh
from tools.swarm.cluster import SwarmCluster
from tools.swarm.net import ping, root_can_connect, tcp_reachable
from tools.swarm.node import SwarmNode

__all__ = ["AGENT_PORT", "REPO_ROOT", "SwarmCluster", "SwarmError", "SwarmNode", "ping", "root_can_connect", "sh",
           "tcp_reachable"]
