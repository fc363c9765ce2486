"""The routing rule table (docs/protocol.md, "Routing"), one test per rule, no sockets."""

from __future__ import annotations

import pytest

from agent.cluster.membership import Member
from proxy.routing import (
    DETAILS_NO_MANAGER,
    DETAILS_NO_TARGET,
    HEADER_MANAGER_OP,
    HEADER_TARGET,
    MSG_NO_AGENT,
    MSG_NO_MANAGER,
    Api,
    Kind,
    classify,
    decide,
)

M1 = Member("n1", "10.0.0.1", 9001, role="manager", is_leader=True)
M2 = Member("n2", "10.0.0.2", 9001, role="manager")
W1 = Member("w1", "10.0.0.3", 9001, role="worker")
W2 = Member("w2", "10.0.0.4", 9001, role="worker")
ALL = [M1, M2, W1, W2]


def route(method: str, path: str, headers: dict[str, str] | None = None, me: Member = W1,
          members: list[Member] | None = None, clustered: bool = True):  # type: ignore[no-untyped-def]
    return decide(method, path, headers or {}, me, ALL if members is None else members, clustered)


@pytest.mark.parametrize(("method", "path", "api", "op", "vol"), [
    ("GET", "/ping", Api.PING, "", None),
    ("POST", "/ping", Api.NOT_FOUND, "", None),
    ("GET", "/key", Api.KEY, "", None),
    ("POST", "/key", Api.KEY, "", None),
    ("GET", "/agents", Api.AGENTS, "", None),
    ("POST", "/agents", Api.METHOD_NOT_ALLOWED, "", None),
    ("DELETE", "/v2/agents", Api.METHOD_NOT_ALLOWED, "", None),
    ("GET", "/host/info", Api.HOST_INFO, "", None),
    ("GET", "/browse/ls", Api.BROWSE, "ls", None),
    ("GET", "/websocket/exec", Api.WEBSOCKET, "exec", None),
    ("GET", "/websocket/attach", Api.WEBSOCKET, "attach", None),
    ("GET", "/kubernetes/x", Api.UNSUPPORTED, "", None),
    ("GET", "/nomad/x", Api.UNSUPPORTED, "", None),
    ("GET", "/metrics", Api.METRICS, "", None),
    ("GET", "/v2/ping", Api.PING, "", None),
    ("GET", "/v2/agents", Api.AGENTS, "", None),
    ("POST", "/v2/dockerhub", Api.DOCKERHUB, "", None),
    ("GET", "/v2/host/info", Api.HOST_INFO, "", None),
    ("PUT", "/v2/browse/rename", Api.BROWSE, "rename", None),
    ("GET", "/v2/websocket/attach", Api.WEBSOCKET, "attach", None),
    ("GET", "/v2/containers/json", Api.DOCKER, "", None),
    ("GET", "/v1/agents", Api.AGENTS, "", None),
    ("GET", "/v1/host/info", Api.HOST_INFO, "", None),
    ("GET", "/v1/browse/myvol/ls", Api.BROWSE, "ls", "myvol"),
    ("DELETE", "/v1/browse/myvol/delete", Api.BROWSE, "delete", "myvol"),
    ("GET", "/v1/browse/ls", Api.NOT_FOUND, "", None),
    ("GET", "/v1/websocket/exec", Api.WEBSOCKET, "exec", None),
    ("GET", "/v1.41/containers/json", Api.DOCKER, "", None),
    ("GET", "/containers/json", Api.DOCKER, "", None),
    ("GET", "/_ping", Api.DOCKER, "", None),
])
def test_classify(method: str, path: str, api: Api, op: str, vol: str | None) -> None:
    r = classify(method, path)
    assert (r.api, r.op, r.volume_id) == (api, op, vol)


def test_signature_needed_everywhere_but_ping_and_key() -> None:
    assert not classify("GET", "/ping").needs_signature
    assert not classify("GET", "/key").needs_signature
    assert not classify("GET", "/key").agent_headers
    for path in ("/agents", "/containers/json", "/browse/ls", "/metrics", "/v2/dockerhub"):
        assert classify("GET", path).needs_signature


def test_standalone_engine_serves_everything_locally() -> None:
    for path in ("/containers/json", "/services", "/info"):
        r = route("GET", path, {HEADER_TARGET: "n2", HEADER_MANAGER_OP: "1"}, clustered=False)
        assert r.kind is Kind.LOCAL


def test_manager_operation_header_on_a_worker_goes_to_the_leader() -> None:
    r = route("GET", "/containers/abc/json", {HEADER_MANAGER_OP: "1"})
    assert (r.kind, r.member) == (Kind.PEER, M1)


def test_manager_operation_header_on_a_manager_is_local() -> None:
    assert route("GET", "/containers/json", {HEADER_MANAGER_OP: "1"}, me=M2).kind is Kind.LOCAL


@pytest.mark.parametrize("path", ["/services", "/services/create", "/tasks", "/secrets/x", "/configs",
                                  "/swarm", "/swarm/init", "/info", "/nodes", "/nodes/abc"])
def test_manager_prefixes(path: str) -> None:
    assert route("GET", path, me=W1).member == M1
    assert route("GET", path, me=M2).kind is Kind.LOCAL


def test_manager_prefix_needs_a_segment_boundary() -> None:
    assert route("GET", "/servicesx").kind is Kind.LOCAL
    assert route("GET", "/information").kind is Kind.LOCAL


def test_no_manager_alive_is_an_error() -> None:
    r = route("GET", "/services", members=[W1, W2])
    assert (r.kind, r.status, r.message, r.details) == (Kind.ERROR, 500, MSG_NO_MANAGER, DETAILS_NO_MANAGER)


def test_without_a_leader_any_manager_will_do() -> None:
    r = route("GET", "/nodes", members=[M2, W1])
    assert r.member == M2


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/containers/json"), ("POST", "/containers/json"), ("GET", "/images/json"),
    ("GET", "/volumes"), ("GET", "/networks"),
])
def test_cluster_operations_fan_out(method: str, path: str) -> None:
    assert route(method, path).kind is Kind.FANOUT


def test_cluster_operation_methods_matter_for_volumes_and_networks() -> None:
    assert route("POST", "/volumes").kind is Kind.LOCAL
    assert route("POST", "/networks").kind is Kind.LOCAL
    assert route("GET", "/volumes/abc").kind is Kind.LOCAL
    assert route("GET", "/containers/abc/json").kind is Kind.LOCAL


def test_cluster_operation_targeting_this_node_is_local() -> None:
    assert route("GET", "/containers/json", {HEADER_TARGET: "w1"}).kind is Kind.LOCAL


def test_cluster_operation_targeting_another_node_asks_only_that_node() -> None:
    # a fan-out restricted to that member, so that its items carry the node name as Go's merged answer does
    r = route("GET", "/images/json", {HEADER_TARGET: "w2"})
    assert (r.kind, r.member) == (Kind.FANOUT, W2)


def test_cluster_operation_targeting_an_unknown_node_fans_out_like_go() -> None:
    assert route("GET", "/images/json", {HEADER_TARGET: "ghost"}).kind is Kind.FANOUT


def test_node_operation_without_target_is_local() -> None:
    assert route("POST", "/containers/create").kind is Kind.LOCAL


def test_node_operation_targets_a_member() -> None:
    r = route("POST", "/containers/abc/start", {HEADER_TARGET: "n2"})
    assert (r.kind, r.member) == (Kind.PEER, M2)


def test_node_operation_target_header_is_case_insensitive_and_trimmed() -> None:
    r = route("DELETE", "/containers/abc", {"x-portaineragent-target": " w2 "})
    assert (r.kind, r.member) == (Kind.PEER, W2)


def test_node_operation_to_an_unknown_target_is_the_go_error() -> None:
    r = route("GET", "/containers/abc/json", {HEADER_TARGET: "ghost"})
    assert (r.kind, r.status, r.message, r.details) == (Kind.ERROR, 500, MSG_NO_AGENT, DETAILS_NO_TARGET)


def test_first_member_with_the_name_wins() -> None:
    dup = Member("w2", "10.9.9.9", 9001)
    r = route("GET", "/containers/abc/json", {HEADER_TARGET: "w2"}, members=[*ALL, dup])
    assert r.member == W2


# --- manager operations that follow the Swarm ------------------------------------------------------------

MA = Member("ma", "10.0.1.1", 9001, role="manager", node_id="IDA")
MB = Member("mb", "10.0.1.2", 9001, role="manager", is_leader=True, node_id="IDB")
MC = Member("mc", "10.0.1.3", 9001, role="manager", node_id="IDC")
WX = Member("wx", "10.0.1.4", 9001, role="worker", node_id="IDX")
WY = Member("wy", "10.0.1.5", 9001, role="worker", node_id="IDY")


def test_manager_operation_tries_every_manager_leader_first() -> None:
    r = decide("GET", "/services", {}, WX, [MA, MB, MC, WX, WY], True)
    assert r.kind is Kind.PEER and [m.node_name for m in r.candidates] == ["mb", "ma", "mc"]
    assert r.member == MB


def test_the_engines_view_of_managers_beats_stale_tags() -> None:
    # mc was demoted (its tag is stale), wy was promoted (its agent has not noticed yet)
    r = decide("GET", "/nodes", {}, WX, [MA, MB, MC, WX, WY], True, engine_managers={"IDA", "IDB", "IDY"})
    assert [m.node_name for m in r.candidates] == ["mb", "ma", "wy"]
    # a Go agent (no node ID tag) is still taken by its tag
    go = Member("go", "10.0.1.9", 9001, role="manager")
    r = decide("GET", "/nodes", {}, WX, [go, WX], True, engine_managers={"IDA"})
    assert [m.node_name for m in r.candidates] == ["go"]


def test_no_manager_known_by_the_engine_is_the_go_error() -> None:
    r = decide("GET", "/services", {}, WX, [MA, WX], True, engine_managers={"IDZ"})
    assert (r.kind, r.message) == (Kind.ERROR, MSG_NO_MANAGER)
