"""Scenario 4: scale past this machine by simulation. N agents in ONE process (`python -m bench.sim SPEC`, a
child of the bench), each a real agent application (agent.server.build_app on an AgentState built by hand:
real TLS listener, signature check, routing, peer pool, fan-out and merge) with a StaticMembership of the N
simulated members, and each backed by a small in-process Docker API stand-in (an aiohttp app answering
/containers/json etc. with C fake containers). Agent i listens on 127.77.x.y (loopback), its stand-in on the
same address, both on ports the kernel picks.

Everything runs on one event loop, so a fan-out's latency here is the whole cluster's CPU work done in
series (each real node would do its share in parallel): it shows how cost grows with N, an upper bound of
the real latency. The bench drives the entry agent (node 0) from another process and samples this process's
RSS; the idle RSS before and after the agents are built gives the memory of one agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.common import PY, REPO, RssSampler, Sizes, log, ratio, rss_kib, stop_pid

# ----------------------------------------------------------------------------- the Docker API stand-in


def fake_containers(node: str, count: int) -> list[dict[str, Any]]:
    """Containers shaped like Docker's `GET /containers/json?all=1` items (about 1 KB of JSON each)."""
    out = []
    for j in range(count):
        cid = f"{abs(hash((node, j))):016x}" * 4
        out.append({
            "Id": cid[:64], "Names": [f"/{node}-app-{j}"], "Image": "busybox:local",
            "ImageID": "sha256:" + "ab" * 32, "Command": "sh -c 'sleep infinity'", "Created": 1760000000 + j,
            "Ports": [{"PrivatePort": 8080, "Type": "tcp"}],
            "Labels": {"com.docker.stack.namespace": "bench", "com.docker.swarm.service.name": f"svc{j % 7}",
                       "keelson.bench": "1"},
            "State": "running" if j % 3 else "exited", "Status": "Up 2 hours" if j % 3 else "Exited (0) 1 hour ago",
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {"Networks": {"bridge": {
                "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": "cd" * 32,
                "EndpointID": "ef" * 32, "Gateway": "172.17.0.1", "IPAddress": f"172.17.{j // 250}.{j % 250 + 2}",
                "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
                "MacAddress": "02:42:ac:11:00:02", "DriverOpts": None}}},
            "Mounts": [{"Type": "volume", "Name": f"data{j}", "Source": f"/var/lib/docker/volumes/data{j}/_data",
                        "Destination": "/data", "Driver": "local", "Mode": "z", "RW": True, "Propagation": ""}],
        })
    return out


def fake_engine_app(node: str, containers: int) -> web.Application:
    listing = json.dumps(fake_containers(node, containers)).encode()
    version = json.dumps({"Version": "28.2.2", "ApiVersion": "1.50", "Os": "linux", "Arch": "amd64"}).encode()
    info = json.dumps({"Name": node, "ServerVersion": "28.2.2", "Swarm": {"NodeID": f"id-{node}",
                                                                         "LocalNodeState": "active"}}).encode()

    async def handler(request: web.Request) -> web.Response:
        path = request.path
        if path.startswith("/v1."):
            path = "/" + path.split("/", 2)[2]
        if path == "/_ping":
            return web.Response(body=b"OK", content_type="text/plain")
        if path == "/containers/json":
            return web.Response(body=listing, content_type="application/json")
        if path == "/version":
            return web.Response(body=version, content_type="application/json")
        if path == "/info":
            return web.Response(body=info, content_type="application/json")
        if path in ("/images/json", "/networks"):
            return web.Response(body=b"[]", content_type="application/json")
        if path == "/volumes":
            return web.Response(body=b'{"Volumes":[],"Warnings":null}', content_type="application/json")
        return web.json_response({"message": f"page not found: {path}"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


# ----------------------------------------------------------------------------- the simulated cluster


def sim_ip(i: int) -> str:
    return f"127.77.{1 + i // 250}.{1 + i % 250}"


def _bound_socket(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _agent_app(i: int, members: list[Any], engine_url: str, data_dir: Path, docker: Any,
               fanout_timeout: float) -> tuple[Any, web.Application]:
    """Simulated agent i: a real application on a hand-built state (the members are static)."""
    from agent.auth import SignatureVerifier
    from agent.cluster.membership import StaticMembership
    from agent.config import Config, DockerEndpoint
    from agent.engine import EngineInfo
    from agent.metrics import Metrics
    from agent.server import build_app
    from agent.state import AgentState
    from agent.tls import peer_client_context
    from proxy.upstream import EngineUpstream, PeerPool

    ip = sim_ip(i)
    config = Config(agent_host=ip, agent_port=members[i].agent_port, data_path=data_dir / f"sim{i}",
                    docker=DockerEndpoint(url="tcp://" + engine_url.split("://", 1)[1]),
                    fanout_timeout=fanout_timeout, log_level="WARN")
    state = AgentState(
        config=config, verifier=SignatureVerifier(), metrics=Metrics(), engine=EngineUpstream(config.docker),
        docker=docker,
        info=EngineInfo(node_name=f"sim{i}", node_id=f"id-sim{i}", swarm=True, manager=i == 0, leader=i == 0),
        advertise_addr=ip, peers=PeerPool(tls=True, client_context=peer_client_context(config)),
        membership=StaticMembership([dataclasses.replace(m) for m in members]),
    )
    return state, build_app(state)


async def serve(spec: dict[str, Any]) -> None:
    """Spec: nodes, containers, fanout_timeout; ``entry_apart``: agent 0 is left to another process (its
    socket is not bound here); ``entry_of``: be that process, agent 0 alone, given the members and engine 0."""
    import aiodocker

    from agent.cluster.membership import ROLE_MANAGER, ROLE_WORKER, Member
    from agent.tls import server_context
    from agent.tlsproto import server_protocol_factory

    n = int(spec["nodes"])
    containers = int(spec["containers"])
    timeout = float(spec.get("fanout_timeout", 60.0))
    loop = asyncio.get_running_loop()
    data_dir = Path(tempfile.mkdtemp(prefix="keelson-sim-"))
    runners: list[web.AppRunner] = []
    states: list[Any] = []
    servers: list[asyncio.AbstractServer] = []
    rss_start = rss_kib(os.getpid())
    engines: list[str] = []
    entry_of = spec.get("entry_of")
    if entry_of is None:
        for i in range(n):
            runner = web.AppRunner(fake_engine_app(f"sim{i}", containers), access_log=None, handle_signals=False)
            await runner.setup()
            sock = _bound_socket(sim_ip(i))
            site = web.SockSite(runner, sock)
            await site.start()
            runners.append(runner)
            engines.append(f"http://{sim_ip(i)}:{sock.getsockname()[1]}")
    else:
        engines = [entry_of["engine0"]]
    gc.collect()
    rss_engines = rss_kib(os.getpid())

    mine = [0] if entry_of is not None else [i for i in range(n) if not (spec.get("entry_apart") and i == 0)]
    socks = {i: _bound_socket(sim_ip(i)) for i in mine}
    if entry_of is not None:
        ports = list(entry_of["ports"])
        ports[0] = socks[0].getsockname()[1]
    else:
        ports = [socks[i].getsockname()[1] if i in socks else 0 for i in range(n)]
    members = [Member(node_name=f"sim{i}", ip=sim_ip(i), agent_port=ports[i],
                      role=ROLE_MANAGER if i == 0 else ROLE_WORKER, is_leader=i == 0) for i in range(n)]
    docker = aiodocker.Docker(url=engines[0])  # only the agent's own API calls use it; none in this bench
    for i in mine:
        state, app = _agent_app(i, members, engines[i], data_dir, docker, timeout)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        factory = server_protocol_factory(loop, runner.server, server_context(state.config, [sim_ip(i)]))
        servers.append(await loop.create_server(factory, sock=socks[i], backlog=1024))
        runners.append(runner)
        states.append(state)
    gc.collect()
    rss_agents = rss_kib(os.getpid())
    print(json.dumps({
        "entry": f"https://{sim_ip(0)}:{members[0].agent_port}", "engines": engines, "pid": os.getpid(),
        "ports": ports, "rss_start_kib": rss_start, "rss_engines_kib": rss_engines, "rss_agents_kib": rss_agents,
    }), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the bench closes our stdin to stop us
    await stop.wait()
    loop.remove_reader(sys.stdin.fileno())
    for server in servers:
        server.close()
    for state in states:
        with contextlib.suppress(Exception):
            await state.peers.close()
            await state.engine.close()
    for runner in runners:
        await runner.cleanup()
    await docker.close()
    shutil.rmtree(data_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the bench side


@contextlib.contextmanager
def cluster(nodes: int, containers: int, tree: Path | None = None, **extra: Any) -> Iterator[dict[str, Any]]:
    """The simulation child with `nodes` agents; yields its ready line (entry URL, engines, pid, RSS)."""
    spec = {"nodes": nodes, "containers": containers, "fanout_timeout": 120.0, **extra}
    env = dict(os.environ)
    if tree is not None:
        # `python -m` puts its working directory first on sys.path: run in the tree, find bench/ after it.
        env["PYTHONPATH"] = f"{tree}:{REPO}"
    proc = subprocess.Popen([PY, "-m", "bench.sim", json.dumps(spec)], cwd=tree or REPO, env=env,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the simulation of {nodes} agents exited with {proc.wait()}")
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_pid(proc)


def fanout_spec(entry: str, headers: dict[str, str], reps: int) -> dict[str, Any]:
    return {"mode": "load", "url": entry + "/containers/json?all=1", "headers": headers, "concurrency": 1,
            "requests": reps, "seconds": 300, "warmup": 2, "count_json": True,
            "watch_header": "X-Keelson-Failed-Nodes", "keep_latencies": True}


def _one_size(nodes: int, sizes: Sizes, headers: dict[str, str], tree: Path | None) -> dict[str, Any]:
    from bench import loadgen

    with cluster(nodes, sizes.sim_containers, tree) as ready:
        idle = rss_kib(ready["pid"])
        with RssSampler(ready["pid"]) as sampler:
            res = loadgen.launch(fanout_spec(ready["entry"], headers, sizes.sim_reps), timeout=900)
        direct = loadgen.launch({"mode": "multi", "urls": [e + "/containers/json?all=1" for e in ready["engines"]],
                                 "reps": sizes.sim_reps}, timeout=900)
        expected = nodes * sizes.sim_containers
        if res["errors"] or res["json_lengths"] != [expected] or any(res["header_values"]):
            raise RuntimeError(f"simulated fan-out over {nodes}: lengths {res['json_lengths']} (want {expected}), "
                               f"failed nodes {res['header_values'][:1]}, errors {res['first_errors']}")
        per_agent = (ready["rss_agents_kib"] - ready["rss_engines_kib"]) / nodes / 1024
        out = {
            "nodes": nodes, "items": expected,
            "fanout_p50_ms": res["p50_ms"], "fanout_p99_ms": res["p99_ms"],
            "fanout_per_node_ms": round(res["p50_ms"] / nodes, 3),
            "direct_all_engines_p50_ms": direct["p50_ms"],
            "p50_fanout/direct_all": ratio(res["p50_ms"], direct["p50_ms"]),
            "process_rss_idle_mib": round(idle / 1024, 1),
            "process_rss_peak_mib": sampler.peak_mib,
            "rss_per_agent_idle_mib": round(per_agent, 2),
            "fanout_rss_growth_mib": round(sampler.peak_mib - idle / 1024, 1),
            "response_bytes": res["bytes_per_response"],
        }
        log(f"sim {nodes:>4} agents{' (before)' if tree else ''}: fan-out p50 {res['p50_ms']:.1f} ms "
            f"({out['fanout_per_node_ms']} ms/node), direct {direct['p50_ms']:.1f} ms; RSS "
            f"{out['process_rss_idle_mib']} MiB idle ({out['rss_per_agent_idle_mib']} MiB/agent), "
            f"peak {out['process_rss_peak_mib']} MiB")
        return out


def entry_alone(nodes: int, sizes: Sizes, headers: dict[str, str]) -> dict[str, Any]:
    """The entry agent in a process of its own (the others and every engine in a second one): its RSS idle
    and at its peak during fan-outs over ``nodes`` simulated nodes, i.e. what one real agent needs."""
    from bench import loadgen

    with cluster(nodes, sizes.sim_containers, entry_apart=True) as rest:
        entry_spec = {"engine0": rest["engines"][0], "ports": rest["ports"]}
        with cluster(nodes, sizes.sim_containers, entry_of=entry_spec) as entry:
            idle = rss_kib(entry["pid"])
            with RssSampler(entry["pid"]) as sampler:
                res = loadgen.launch(fanout_spec(entry["entry"], headers, sizes.sim_reps), timeout=900)
            expected = nodes * sizes.sim_containers
            if res["errors"] or res["json_lengths"] != [expected]:
                raise RuntimeError(f"entry-alone fan-out over {nodes}: lengths {res['json_lengths']} (want "
                                   f"{expected}), errors {res['first_errors']}")
    out = {"nodes": nodes, "items": expected, "entry_rss_idle_mib": round(idle / 1024, 1),
           "entry_rss_peak_mib": sampler.peak_mib, "fanout_p50_ms": res["p50_ms"],
           "response_bytes": res["bytes_per_response"]}
    log(f"sim entry agent alone, {nodes} nodes: RSS {out['entry_rss_idle_mib']} MiB idle, peak "
        f"{out['entry_rss_peak_mib']} MiB during the fan-out (p50 {res['p50_ms']:.1f} ms)")
    return out


def run(sizes: Sizes, headers: dict[str, str], tree: Path | None = None) -> dict[str, Any]:
    rows = [_one_size(n, sizes, headers, None) for n in sizes.sim_nodes]
    out: dict[str, Any] = {"containers_per_node": sizes.sim_containers, "rows": rows}
    alone = [n for n in sizes.sim_nodes if n in (50, 200)] or [sizes.sim_nodes[-1]]
    out["entry_alone"] = [entry_alone(n, sizes, headers) for n in alone]
    out["entry_peak_rss_mib_at_most_nodes"] = out["entry_alone"][-1]["entry_rss_peak_mib"]
    small, big = rows[0], rows[-1]
    out[f"p50_ratio_{big['nodes']}/{small['nodes']}_nodes"] = ratio(big["fanout_p50_ms"], small["fanout_p50_ms"])
    out["node_ratio"] = ratio(big["nodes"], small["nodes"])
    if tree is not None:
        before = [_one_size(n, sizes, headers, tree) for n in sizes.sim_nodes]
        out["before_rows"] = before
        out["p50_after/before"] = {str(a["nodes"]): ratio(a["fanout_p50_ms"], b["fanout_p50_ms"])
                                   for a, b in zip(rows, before, strict=True)}
    return out


if __name__ == "__main__":
    asyncio.run(serve(json.loads(sys.argv[1])))
