"""`python -m tools.swarm up|down`: the namespace Swarm from the command line (what ./dev.sh swarm runs)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from tools.swarm import __doc__ as package_doc
from tools.swarm.base import AGENT_PORT, SwarmError, tail
from tools.swarm.cluster import SwarmCluster


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
                print(f"--- {node.agent_log}\n{tail(node.agent_log)}", file=sys.stderr)
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
    parser = argparse.ArgumentParser(prog="python -m tools.swarm", description=(package_doc or "").splitlines()[0])
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
