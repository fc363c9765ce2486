"""One member per node name, the newest live agent winning (no serf process: the member table only)."""

from __future__ import annotations

from agent.cluster.serf import TAG_NODE_NAME, TAG_STARTED, SerfMembership
from agent.cluster.serf_rpc import SerfMember


def serf_member(name: str, node: str, addr: str, status: str, started: int) -> SerfMember:
    return SerfMember(name, addr, 7946, status, {TAG_NODE_NAME: node, TAG_STARTED: str(started),
                                                 "AgentPort": "9001"})


def publish(*items: SerfMember) -> SerfMembership:
    membership = SerfMembership(node_name="n1", bind_ip="127.0.0.1", hostname="h")
    membership._known = {item.name: item for item in items}
    membership._publish()
    return membership


def test_the_newest_live_agent_of_a_node_wins_whatever_the_names() -> None:
    # the restarted agent's serf name sorts first, and its dead twin's later: the start time decides
    m = publish(serf_member("n2-zzz", "n2", "10.0.0.2", "alive", 100),
                serf_member("n2-aaa", "n2", "10.0.0.9", "alive", 200),
                serf_member("n1-h", "n1", "10.0.0.1", "alive", 50))
    assert [(x.node_name, x.ip) for x in m.members()] == [("n1", "10.0.0.1"), ("n2", "10.0.0.9")]


def test_failed_and_left_agents_are_not_members() -> None:
    m = publish(serf_member("n2-old", "n2", "10.0.0.2", "failed", 300),
                serf_member("n2-new", "n2", "10.0.0.9", "alive", 200),
                serf_member("n3-x", "n3", "10.0.0.3", "failed", 100),
                serf_member("n4-x", "n4", "10.0.0.4", "left", 100))
    assert [(x.node_name, x.ip) for x in m.members()] == [("n2", "10.0.0.9")]
