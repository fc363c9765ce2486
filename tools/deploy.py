"""The agent image as a Swarm stack on the namespace Swarm: `python -m tools.deploy` (`./dev.sh swarm deploy`).

    python -m tools.deploy [--state-dir .swarm] [--stack keelson] [--nodes 3]   build/load/deploy, wait
    python -m tools.deploy --rm [--state-dir .swarm] [--stack keelson]          remove the stack

Deploy: uses the Swarm recorded in the state dir (or brings one up, without the harness's agents, when there
is none); builds the image with tools.image (cached when nothing changed); loads it on every node
(`docker save | docker load`: no registry); runs `docker stack deploy` of docker-compose.swarm.yml on the
manager, with the image's build tag, so that deploying again after a change is a rolling update; waits until a
task runs on every node and every agent's `GET /agents` (through the port each node publishes) names every node.

The stack file binds /var/run/docker.sock and /var/lib/docker/volumes by default. Here every node is a dockerd
with its own root, so the deploy points both at that node's folders with Swarm's {{.Node.Hostname}} template
(node names are their hostnames and their folders' names).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tools.dockerd import DOCKER_CLI
from tools.image import REPO_ROOT, BuiltImage, ImageError, build_image
from tools.swarm import SwarmCluster, SwarmError, SwarmNode

STACK_FILE = REPO_ROOT / "docker-compose.swarm.yml"
DEFAULT_STACK = "keelson"
SERVICE = "agent"  # the service's name in the stack file; Swarm names it <stack>_agent
# What an agent that cannot resolve its cluster address logs (agent/cluster/bootstrap.py).
LOOKUP_FATAL = "cannot resolve cluster address"


class DeployError(RuntimeError):
    """Deploying, waiting for or removing the stack failed; the message says what was seen."""


def service_name(stack: str) -> str:
    return f"{stack}_{SERVICE}"


def node_paths(cluster: SwarmCluster) -> tuple[str, str]:
    """(docker socket, volumes folder) of every node as one Swarm template over {{.Node.Hostname}}."""
    parents = {node.dir.parent for node in cluster.nodes}
    if len(parents) != 1 or any(node.dir.name != node.name for node in cluster.nodes):
        raise DeployError(f"node folders {[str(n.dir) for n in cluster.nodes]} are not <dir>/<node name>")
    for node in cluster.nodes:
        if node.engine.root != node.dir / "dockerd":
            raise DeployError(f"{node.name}: dockerd root {node.engine.root} is not {node.dir / 'dockerd'}")
    template = f"{parents.pop()}/{{{{.Node.Hostname}}}}/dockerd"
    return f"{template}/docker.sock", f"{template}/data/volumes"


def stack_env(cluster: SwarmCluster, image: str) -> dict[str, str]:
    """The variables docker-compose.swarm.yml reads, for this cluster."""
    sock, volumes = node_paths(cluster)
    return {"KEELSON_IMAGE": image, "KEELSON_DOCKER_SOCKET": sock, "KEELSON_DOCKER_VOLUMES": volumes}


def docker(node: SwarmNode, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """The Docker CLI on one node's engine (with extra environment variables, which node.cli cannot pass)."""
    try:
        res = subprocess.run([DOCKER_CLI, "-H", node.docker_host, *args], capture_output=True, text=True,
                             timeout=timeout, check=False, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise DeployError(f"{node.name}: docker {' '.join(args)} did not finish within {timeout:.0f}s") from None
    if check and res.returncode != 0:
        raise DeployError(f"{node.name}: docker {' '.join(args)} failed: {(res.stderr or res.stdout).strip()}")
    return res


# ---------------------------------------------------------------------- image


def tar_image_id(tar: Path) -> str:
    """The image ID inside a `docker save` tarball (its config's digest)."""
    with tarfile.open(tar) as archive:
        member = archive.extractfile("manifest.json")
        if member is None:
            raise DeployError(f"{tar}: no manifest.json (not a docker save tarball?)")
        manifest = json.loads(member.read())
    config = manifest[0]["Config"]
    return "sha256:" + config.rsplit("/", 1)[-1].removesuffix(".json")


def load_image(cluster: SwarmCluster, image: BuiltImage, nodes: list[SwarmNode] | None = None) -> list[str]:
    """`docker load` the image on every node that does not have it yet; returns the names of those loaded."""
    want = tar_image_id(image.tar)

    def load(node: SwarmNode) -> str:
        have = docker(node, "image", "inspect", "--format", "{{.Id}}", image.build_tag, check=False).stdout.strip()
        if have == want:
            return ""
        docker(node, "load", "-q", "-i", str(image.tar), timeout=600)
        return node.name

    targets = nodes or cluster.nodes
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return [name for name in pool.map(load, targets) if name]


# ---------------------------------------------------------------------- stack


def deploy_stack(cluster: SwarmCluster, image: str, stack: str = DEFAULT_STACK) -> None:
    """`docker stack deploy` on the manager (creating the stack, or updating it: a rolling update)."""
    docker(cluster.manager, "stack", "deploy", "--resolve-image", "never", "--prune", "-c", str(STACK_FILE), stack,
           env=stack_env(cluster, image))


def running_tasks(cluster: SwarmCluster, stack: str = DEFAULT_STACK) -> dict[str, tuple[str, str]]:
    """Node name -> (image, current state) of the task Swarm wants running there."""
    res = docker(cluster.manager, "service", "ps", "--no-trunc", "--filter", "desired-state=running", "--format",
                 "{{.Node}}\t{{.Image}}\t{{.CurrentState}}", service_name(stack), check=False)
    out: dict[str, tuple[str, str]] = {}
    for line in res.stdout.splitlines():
        node, image, state = [*line.split("\t"), "", ""][:3]
        if node:
            out[node] = (image, state)
    return out


def agent_containers(node: SwarmNode, stack: str = DEFAULT_STACK, running: bool = True) -> list[str]:
    """IDs of the stack's agent containers on one node (newest first)."""
    args = ["ps", "-q", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={service_name(stack)}"]
    return docker(node, *args, *([] if running else ["-a"]), check=False).stdout.split()


def agents_seen(cluster: SwarmCluster, node: SwarmNode) -> set[str] | str:
    """The NodeNames that node's agent lists at `GET /agents` (its published port), or why it did not answer."""
    try:
        status, _, body = cluster.agent_request(node.index, "GET", "/agents", timeout=3)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        return {str(a.get("NodeName")) for a in json.loads(body) if isinstance(a, dict)}
    except ValueError:
        return f"not JSON: {body[:200]!r}"


@dataclass
class Waited:
    seconds: float
    detail: str


def wait_until(check: Callable[[], str], timeout: float, what: str, on_timeout: Callable[[], str] | None = None,
               interval: float = 1.0) -> Waited:
    """Poll `check` (returns "" when done, else what it saw) until done or `timeout` seconds."""
    started = time.monotonic()
    seen = ""
    while True:
        seen = check()
        if not seen:
            return Waited(time.monotonic() - started, "")
        if time.monotonic() - started > timeout:
            extra = on_timeout() if on_timeout else ""
            raise DeployError(f"{what}: not done after {timeout:.0f}s; last seen: {seen}" + (f"\n{extra}" if extra
                                                                                              else ""))
        time.sleep(interval)


def wait_running(cluster: SwarmCluster, nodes: list[SwarmNode], stack: str = DEFAULT_STACK,
                 timeout: float = 180, image: str | None = None) -> Waited:
    """Until every node of `nodes` (and no other) has the agent task running (Swarm: started and healthy), of
    `image` when given (after a `stack deploy` that changed it, the old tasks run until each is replaced)."""
    want = {n.name for n in nodes}

    def check() -> str:
        tasks = running_tasks(cluster, stack)
        ok = {name for name, (img, state) in tasks.items()
              if state.startswith("Running") and (image is None or img == image)}
        return "" if ok == want and set(tasks) == want else f"tasks {tasks}"

    return wait_until(check, timeout, f"agent task running on {sorted(want)}", partial(diagnose, cluster, stack))


def wait_agents(cluster: SwarmCluster, nodes: list[SwarmNode], stack: str = DEFAULT_STACK,
                timeout: float = 120) -> Waited:
    """Until the agent of every node of `nodes` lists exactly those nodes at `GET /agents`."""
    want = {n.name for n in nodes}

    def check() -> str:
        seen = {node.name: agents_seen(cluster, node) for node in nodes}
        bad = {name: got for name, got in seen.items() if got != want}
        return "; ".join(f"{k}: {sorted(v) if isinstance(v, set) else v}" for k, v in sorted(bad.items()))

    return wait_until(check, timeout, f"every agent listing {sorted(want)}", partial(diagnose, cluster, stack))


def diagnose(cluster: SwarmCluster, stack: str = DEFAULT_STACK) -> str:
    """Task states and the last log lines of each node's newest agent container, with known causes named."""
    lines: list[str] = []
    res = docker(cluster.manager, "service", "ps", "--no-trunc", "--format",
                 "{{.Node}} {{.DesiredState}} {{.CurrentState}} {{.Error}}", service_name(stack), check=False)
    lines += ["tasks:", *[f"  {line}" for line in res.stdout.splitlines()[:12]]]
    fatal_lookup = False
    label = f"label=com.docker.swarm.service.name={service_name(stack)}"
    for node in cluster.nodes:
        # The newest agent that exited says why; else the newest one.
        exited = docker(node, "ps", "-aq", "--filter", label, "--filter", "status=exited", check=False).stdout.split()
        ids = exited or agent_containers(node, stack, running=False)
        if not ids:
            continue
        logs = docker(node, "logs", "--tail", "6", ids[0], check=False)
        text = (logs.stdout + logs.stderr).strip()
        fatal_lookup |= LOOKUP_FATAL in text
        lines += [f"{node.name} {'exited ' if exited else ''}{ids[0][:12]}:", *[f"  {ln}" for ln in text.splitlines()]]
    if fatal_lookup:
        lines.append(
            "cause: the agent exits when its cluster address does not resolve yet. With the image's HEALTHCHECK, "
            "Swarm adds a task to the tasks.<service> DNS records only once it is healthy (moby/moby#36737), "
            "and an agent is only healthy once it serves /ping, after its join: on a fresh deploy no agent can "
            "ever resolve tasks.agent. agent/cluster/bootstrap.py must keep going (a cluster of one, retrying "
            "the lookup in the background) instead of stopping.")
    return "\n".join(lines)


def remove_stack(cluster: SwarmCluster, stack: str = DEFAULT_STACK, timeout: float = 90) -> Waited:
    """`docker stack rm`, then wait until no container or network of the stack is left on any node (containers
    of a node that left the Swarm, which the stack no longer reaches, are removed by hand, and networks that
    `stack rm` could not remove while their tasks were stopping are removed again)."""
    docker(cluster.manager, "stack", "rm", stack, check=False)
    label = f"label=com.docker.stack.namespace={stack}"

    def check() -> str:
        left: list[str] = []
        for node in cluster.nodes:
            ids = docker(node, "ps", "-aq", "--filter", label, check=False).stdout.split()
            swarm_state = docker(node, "info", "--format", "{{.Swarm.LocalNodeState}}", check=False).stdout.strip()
            if ids and swarm_state != "active":
                docker(node, "rm", "-f", *ids, check=False)
            nets = docker(node, "network", "ls", "-q", "--filter", label, check=False).stdout.split()
            if nets and not ids:
                # `stack rm` removes the networks right after the services, once: one still in use by a task
                # that was stopping then stays for good, so it is asked again once the containers are gone.
                docker(node, "network", "rm", *nets, check=False)
            if ids or nets:
                left.append(f"{node.name}: {len(ids)} containers, {len(nets)} networks")
        return "; ".join(left)

    return wait_until(check, timeout, f"stack {stack} removed")


# ---------------------------------------------------------------------- CLI


def attach_or_up(state_dir: Path, nodes: int) -> SwarmCluster:
    """The Swarm in state_dir, or a new one (no harness agents) when there is none."""
    if (state_dir / "state.json").exists():
        cluster = SwarmCluster.load(state_dir)
        if cluster.status != "up":
            raise DeployError(f"the Swarm in {state_dir} is {cluster.status!r}: ./dev.sh swarm down, then deploy again")
        running = [n.name for n in cluster.nodes if n.agent_pid is not None]
        if running:
            raise DeployError(f"the Swarm in {state_dir} runs the harness's own agents on {running} (./dev.sh swarm "
                              "up starts them); they hold port 9001 that the stack publishes: ./dev.sh swarm down, "
                              "then ./dev.sh swarm deploy (which brings up a Swarm without them)")
        return cluster
    print(f"no Swarm in {state_dir}: bringing one up ({nodes} nodes, no harness agents)", flush=True)
    return SwarmCluster(state_dir, nodes=nodes).up()


def _cmd_deploy(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cluster = attach_or_up(Path(args.state_dir).resolve(), args.nodes)
    t = time.monotonic()
    image = build_image(args.tag)
    t_image = time.monotonic() - t
    t = time.monotonic()
    loaded = load_image(cluster, image)
    t_load = time.monotonic() - t
    t = time.monotonic()
    deploy_stack(cluster, image.build_tag, args.stack)
    running = wait_running(cluster, cluster.nodes, args.stack, timeout=args.timeout, image=image.build_tag)
    agents = wait_agents(cluster, cluster.nodes, args.stack, timeout=args.timeout)
    t_deploy = time.monotonic() - t
    print(f"stack {args.stack}: {service_name(args.stack)} ({image.build_tag}) on {len(cluster)} nodes; "
          f"image {t_image:.0f}s ({'cached' if image.cached else 'built'}), load {t_load:.0f}s "
          f"({', '.join(loaded) or 'already there'}), deploy {t_deploy:.0f}s (tasks running after "
          f"{running.seconds:.0f}s, one cluster {agents.seconds:.0f}s later); {time.monotonic() - started:.0f}s "
          "in all")
    cfg = cluster.docker_config
    for node in cluster.nodes:
        print(f"  {node.name} {node.ip}:9001")
    print(f"DOCKER_CERT_PATH={cfg} docker --config {cfg} --tls -H tcp://{cluster.manager.ip}:9001 ps")
    print(f"docker -H {cluster.manager.docker_host} service ps {service_name(args.stack)}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    if not (state_dir / "state.json").exists():
        print(f"no Swarm in {state_dir}")
        return 0
    waited = remove_stack(SwarmCluster.load(state_dir), args.stack)
    print(f"stack {args.stack} removed in {waited.seconds:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=".swarm")
    parser.add_argument("--stack", default=DEFAULT_STACK)
    parser.add_argument("--nodes", type=int, default=3, help="size of the Swarm brought up when there is none")
    parser.add_argument("--tag", default="keelson/agent:latest")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each phase")
    parser.add_argument("--rm", action="store_true", help="remove the stack instead")
    args = parser.parse_args(argv)
    try:
        return _cmd_rm(args) if args.rm else _cmd_deploy(args)
    except (DeployError, ImageError, SwarmError) as exc:
        print(f"tools.deploy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tools.deploy: interrupted (the Swarm and whatever was deployed stay; ./dev.sh swarm down)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
