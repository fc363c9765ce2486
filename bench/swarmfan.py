"""Scenario 3: fan-out on the real namespace Swarm (tools/swarm/): N nodes, C created (not running) containers
per node. GET /containers/json?all=1 through one agent vs each node's engine queried directly (alone, and
all at once: on 2 cores three engines listing at the same time share the CPU), then with one node
blackholed (link_down) the answer time vs the per-node deadline KEELSON_FANOUT_TIMEOUT."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.config import parse_go_duration
from bench import loadgen
from bench.common import Sizes, log, median, ratio
from bench.engine import create_containers
from tools.swarm import SwarmCluster

QUERY = "/containers/json?all=1"


def _load(url: str, headers: dict[str, str], reps: int, watch: bool = True, warmup: int = 2) -> dict[str, Any]:
    spec = {"mode": "load", "url": url, "headers": headers, "concurrency": 1, "requests": reps, "seconds": 600,
            "warmup": warmup, "count_json": True, "keep_latencies": True,
            "watch_header": "X-Keelson-Failed-Nodes" if watch else None}
    res = loadgen.launch(spec, timeout=900)
    if res["errors"]:
        raise RuntimeError(f"{url}: {res['errors']} errors, e.g. {res['first_errors']}")
    return res


def run(workdir: Path, sizes: Sizes, timings: dict[str, float], profile_to: Path | None = None) -> dict[str, Any]:
    nodes = sizes.swarm_nodes
    cluster = SwarmCluster(workdir, nodes=nodes)
    deadline_s = parse_go_duration(sizes.fanout_deadline)
    out: dict[str, Any] = {"nodes": nodes, "containers_per_node": sizes.swarm_containers,
                           "fanout_timeout_s": deadline_s}
    t0 = time.monotonic()
    try:
        cluster.up()
        timings["swarm_up_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=nodes) as pool:
            made = list(pool.map(lambda n: create_containers(str(n.socket), sizes.swarm_containers,
                                                             concurrency=6), cluster.nodes))
        timings["swarm_create_containers_s"] = round(time.monotonic() - t0, 1)
        log(f"fan-out: {sum(made)} containers created on {nodes} nodes in {timings['swarm_create_containers_s']} s")
        cluster.start_agents(env={"KEELSON_SERF_PORT": "7947", "KEELSON_FANOUT_TIMEOUT": sizes.fanout_deadline,
                                  "LOG_LEVEL": "INFO"})
        cluster.wait_agents()
        headers = cluster.headers()
        entry = cluster.manager.agent_url + QUERY
        expected = sum(made) + sum(_running_extra(n) for n in cluster.nodes)
        # Interleaved rounds: each engine alone, all engines at once, the agent; a few requests each.
        per_round = max(1, sizes.fanout_reps // 3)
        alone: dict[str, list[float]] = {n.name: [] for n in cluster.nodes}
        together: list[float] = []
        agent_lat: list[float] = []
        lengths: set[int] = set()
        for _ in range(3):
            for node in cluster.nodes:
                res = _load(f"unix://{node.socket}:{QUERY}", {}, per_round, watch=False)
                alone[node.name] += res["latencies_ms"]
            multi = loadgen.launch({"mode": "multi", "urls": [f"unix://{n.socket}:{QUERY}" for n in cluster.nodes],
                                    "reps": per_round}, timeout=600)
            together += multi["rounds_ms"]
            res = _load(entry, headers, per_round)
            if any(res["header_values"]):
                raise RuntimeError(f"healthy fan-out left nodes out: {res['header_values'][0]}")
            agent_lat += res["latencies_ms"]
            lengths.update(res["json_lengths"])
        slowest_name = max(alone, key=lambda k: median(alone[k]))
        slowest = median(alone[slowest_name])
        out["direct_alone_p50_ms"] = {k: round(median(v), 1) for k, v in alone.items()}
        out["slowest_node"] = slowest_name
        out["slowest_node_p50_ms"] = round(slowest, 1)
        out["direct_all_at_once_p50_ms"] = round(median(together), 1)
        out["agent_p50_ms"] = round(median(agent_lat), 1)
        out["agent_items"] = sorted(lengths)
        out["expected_items"] = expected
        out["p50_agent/slowest_node"] = ratio(median(agent_lat), slowest)
        out["p50_agent/direct_all_at_once"] = ratio(median(agent_lat), median(together))
        log(f"fan-out healthy: agent {out['agent_p50_ms']} ms, slowest node alone {out['slowest_node_p50_ms']} ms, "
            f"all engines at once {out['direct_all_at_once_p50_ms']} ms; items {sorted(lengths)}")
        if profile_to is not None and cluster.manager.agent_pid is not None:
            from bench import profiling

            spec = {"mode": "load", "url": entry, "headers": headers, "concurrency": 1, "requests": 10**6,
                    "seconds": sizes.profile_seconds + 2}
            out["entry_agent_profile"] = profiling.profile(cluster.manager.agent_pid, spec, sizes.profile_seconds,
                                                           profile_to)

        # One node blackholed: its veth goes down, packets to it vanish (no RST, no ICMP).
        dead = cluster.node(nodes)
        cluster.link_down(dead.index)
        try:
            # One client, no warm-up: the first request goes out about 0.3 s after the link went down, on the
            # agent's pooled keep-alive connection to the dead node, as Portainer's next poll would.
            t_down = time.monotonic()
            res = _load(entry, headers, max(4, sizes.fanout_reps // 2), warmup=0)
            offset = time.monotonic() - t_down - res["seconds"]
            answers: list[dict[str, Any]] = []
            for ms, at, seen in zip(res["latencies_ms"], res["started_s"], res["header_values"], strict=True):
                answers.append({"after_s": round(offset + at, 2), "ms": ms,
                                "failed": json.loads(seen) if seen else {}})
            with_dead = [a["ms"] for a in answers if dead.name in a["failed"]]
            out["blackhole"] = {
                "node": dead.name,
                "answers": answers,
                "max_ms_with_node_left_out": max(with_dead) if with_dead else 0.0,
                "answers_naming_dead_node": len(with_dead),
                "extra_ms_over_healthy": round(max(with_dead) - median(agent_lat), 1) if with_dead else 0.0,
            }
            out["blackhole"]["extra/deadline"] = ratio(out["blackhole"]["extra_ms_over_healthy"], deadline_s * 1000)
            out["blackhole"]["answer/deadline"] = ratio(out["blackhole"]["max_ms_with_node_left_out"],
                                                        deadline_s * 1000)
            log(f"fan-out with {dead.name} blackholed: answers {[a['ms'] for a in answers]} ms "
                f"(deadline {deadline_s * 1000:.0f} ms)")
        finally:
            cluster.link_up(dead.index)
    finally:
        t0 = time.monotonic()
        cluster.down()
        timings["swarm_down_s"] = round(time.monotonic() - t0, 1)
    return out


def _running_extra(node: Any) -> int:
    """Containers a node had before ours (none on a fresh private dockerd; kept for clarity)."""
    res = node.cli("ps", "-aq", "--filter", "label!=keelson.bench", check=False)
    return len(res.stdout.split())
