"""Scenario: time to recover from each cluster fault, on a namespace Swarm of 5 nodes with 3 managers.

The same faults as tests/cluster/test_resilience.py, timed: from the fault (or the repair) to the moment
what a user does works again through the surviving agents. Polls every 0.2 s; each figure is one run on a
shared 2-core machine, so read them as orders of magnitude (a second or ten seconds), not as exact values.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import log
from tools.swarm import SwarmCluster

AGENT_ENV = {"KEELSON_FANOUT_TIMEOUT": "20s", "KEELSON_PEER_CONNECT_TIMEOUT": "2s",
             "KEELSON_SERF_RECONNECT_TIMEOUT": "8s", "LOG_LEVEL": "INFO"}


def _until(check: Callable[[], bool], limit: float = 180.0) -> float:
    """Seconds until `check()` holds (polled every 0.2 s); raises after `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if check():
                return round(time.monotonic() - start, 2)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not recovered within {limit}s")


def _agents(cluster: SwarmCluster, node: int) -> dict[str, dict[str, Any]]:
    status, _, body = cluster.agent_request(node, "GET", "/agents", timeout=5)
    return {a["NodeName"]: a for a in json.loads(body)} if status == 200 else {}


def _manager_op(cluster: SwarmCluster, node: int) -> bool:
    status, _, _ = cluster.agent_request(node, "GET", "/v1.41/services", timeout=30)
    return status == 200


def _timed_listing(cluster: SwarmCluster, node: int) -> tuple[float, dict[str, str]]:
    start = time.monotonic()
    _, headers, _ = cluster.agent_request(node, "GET", "/v1.41/networks", timeout=60)
    return round(time.monotonic() - start, 2), json.loads(headers.get("X-Keelson-Failed-Nodes", "{}"))


def run(workdir: Path) -> dict[str, Any]:
    cluster = SwarmCluster(workdir, nodes=5, managers=3)
    out: dict[str, Any] = {"nodes": 5, "managers": 3, "agent_env": AGENT_ENV}
    everyone = {f"node{i}" for i in range(1, 6)}
    try:
        cluster.up(timeout=300)
        cluster.start_agents(env=AGENT_ENV)
        cluster.wait_agents(150)

        leader = cluster.leader()
        leader.cli("node", "promote", "node4")
        out["promotion_seen_by_all_s"] = _until(
            lambda: all(_agents(cluster, i)["node4"]["NodeRole"] == "manager" for i in range(1, 6)))
        leader.cli("node", "demote", "node4")
        out["demotion_seen_by_all_s"] = _until(
            lambda: all(_agents(cluster, i)["node4"]["NodeRole"] == "worker" for i in range(1, 6)))
        log(f"recovery: roles {out['promotion_seen_by_all_s']} s / {out['demotion_seen_by_all_s']} s")

        leader = cluster.leader()
        cluster.stop_agent(leader.index, sig=signal.SIGKILL)
        out["leader_agent_killed_manager_op_s"] = _until(lambda: _manager_op(cluster, 5))
        out["leader_agent_killed_dropped_s"] = _until(
            lambda: set(_agents(cluster, 5)) == everyone - {leader.name})
        cluster.start_agent(leader.index)
        out["agent_restarted_listed_s"] = _until(lambda: all(set(_agents(cluster, i)) == everyone
                                                             for i in range(1, 6)))
        log(f"recovery: leader agent killed {out['leader_agent_killed_manager_op_s']} s")

        leader = cluster.leader()
        cut_at = time.monotonic()
        cluster.link_down(leader.index)
        first, failed = _timed_listing(cluster, 5)
        second, failed2 = _timed_listing(cluster, 5)
        out["cut_first_listing_s"], out["cut_second_listing_s"] = first, second
        out["cut_node"] = leader.name
        out["cut_first_listing_failed"] = failed
        out["cut_first_listing_names_it"] = leader.name in failed
        # skipped until a probe answers, or no longer a member once Serf declared it failed
        out["cut_second_listing_skips_it"] = failed2.get(leader.name, "skipped").startswith("skipped")
        _until(lambda: _manager_op(cluster, 5))
        out["cut_manager_op_back_since_cut_s"] = round(time.monotonic() - cut_at, 2)
        cluster.link_up(leader.index)
        out["cut_healed_all_listed_s"] = _until(lambda: all(set(_agents(cluster, i)) == everyone
                                                            for i in range(1, 6)))
        log(f"recovery: leader node cut, manager operations back {out['cut_manager_op_back_since_cut_s']} s "
            f"after the cut")

        cluster.split([4, 5])
        out["split_sides_apart_s"] = _until(lambda: set(_agents(cluster, 1)) == {"node1", "node2", "node3"}
                                            and set(_agents(cluster, 5)) == {"node4", "node5"})
        time.sleep(12)  # past the 8 s reconnect window: each side has reaped the other
        cluster.heal()
        out["split_merged_after_heal_s"] = _until(lambda: all(set(_agents(cluster, i)) == everyone
                                                              for i in range(1, 6)))
        log(f"recovery: split merged {out['split_merged_after_heal_s']} s after the heal")
    finally:
        cluster.stop_agents()
        cluster.down()
    return out
