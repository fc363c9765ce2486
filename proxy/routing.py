"""Where a request goes: pure functions of (method, path, headers, this node, members). No I/O here.

`path` is always the normalised, version-less path of proxy.target. The rule table is the Go agent's
dispatch (docs/protocol.md, "Routing"), written as data so that each rule is tested on its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from agent.cluster.membership import Member, find_member

HEADER_TARGET = "X-PortainerAgent-Target"
HEADER_MANAGER_OP = "X-PortainerAgent-ManagerOperation"

# --- Agent API dispatch ----------------------------------------------------------------------------------


class Api(Enum):
    KEY = "key"
    PING = "ping"
    AGENTS = "agents"
    HOST_INFO = "host_info"
    BROWSE = "browse"
    WEBSOCKET = "websocket"
    DOCKERHUB = "dockerhub"
    METRICS = "metrics"
    UNSUPPORTED = "unsupported"  # /kubernetes and /nomad: not a Docker agent's business
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    DOCKER = "docker"


@dataclass(frozen=True)
class ApiRoute:
    api: Api
    op: str = ""  # browse op (ls/get/...) or websocket kind (attach/exec)
    volume_id: str | None = None  # v1 browse form carries it in the path

    @property
    def needs_signature(self) -> bool:
        """Everything but /ping and /key is signed (host info is checked by the node that serves it)."""
        return self.api not in (Api.PING, Api.KEY)

    @property
    def agent_headers(self) -> bool:
        return self.api is not Api.KEY


_V2_SERVED = {"ping", "agents", "dockerhub", "host", "browse", "websocket", "kubernetes"}


def _first(path: str) -> tuple[str, str]:
    parts = path.lstrip("/").split("/", 1)
    return parts[0], "/" + parts[1] if len(parts) > 1 else ""


def _sub_api(head: str, rest: str, method: str, v1: bool = False) -> ApiRoute | None:
    """The agent endpoints below a prefix: `agents`, `host/info`, `browse/...`, `websocket/...`."""
    op = rest.strip("/")
    if head == "ping":
        return ApiRoute(Api.PING) if method in ("GET", "HEAD") else ApiRoute(Api.NOT_FOUND)
    if head == "agents":
        return ApiRoute(Api.AGENTS) if method == "GET" else ApiRoute(Api.METHOD_NOT_ALLOWED)
    if head == "host":
        return ApiRoute(Api.HOST_INFO) if op == "info" else ApiRoute(Api.NOT_FOUND)
    if head == "dockerhub":
        return ApiRoute(Api.DOCKERHUB)
    if head == "browse":
        if v1:
            parts = op.split("/")
            if len(parts) == 2 and parts[0] and parts[1]:
                return ApiRoute(Api.BROWSE, op=parts[1], volume_id=parts[0])
            return ApiRoute(Api.NOT_FOUND)
        return ApiRoute(Api.BROWSE, op=op) if op and "/" not in op else ApiRoute(Api.NOT_FOUND)
    if head == "websocket":
        return ApiRoute(Api.WEBSOCKET, op=op) if op in ("attach", "exec") else ApiRoute(Api.NOT_FOUND)
    if head in ("kubernetes", "nomad"):
        return ApiRoute(Api.UNSUPPORTED)
    return None


def classify(method: str, path: str) -> ApiRoute:
    """Which handler serves a path: an agent endpoint, or the Docker proxy (everything else)."""
    head, rest = _first(path)
    if head == "key":
        return ApiRoute(Api.KEY)
    if head == "metrics" and rest == "":
        return ApiRoute(Api.METRICS)
    if head == "v2":
        sub_head, sub_rest = _first(rest)
        if sub_head in _V2_SERVED:
            return _sub_api(sub_head, sub_rest, method) or ApiRoute(Api.DOCKER)
        return ApiRoute(Api.DOCKER)
    if head == "v1":
        sub_head, sub_rest = _first(rest)
        if sub_head in ("agents", "host", "browse", "websocket"):
            return _sub_api(sub_head, sub_rest, method, v1=True) or ApiRoute(Api.DOCKER)
        return ApiRoute(Api.DOCKER)
    return _sub_api(head, rest, method) or ApiRoute(Api.DOCKER)


# --- Docker proxy dispatch --------------------------------------------------------------------------------


class Kind(Enum):
    LOCAL = "local"
    PEER = "peer"
    FANOUT = "fanout"
    ERROR = "error"


@dataclass(frozen=True)
class DockerRoute:
    kind: Kind
    member: Member | None = None
    status: int = 200
    message: str = ""
    details: str | None = None
    label: str = ""  # what the metrics call it: local, peer, manager, fanout, error
    candidates: tuple[Member, ...] = ()
    """Manager operations: every manager to try, in order (leader first); `member` is the first."""

    @property
    def metric_label(self) -> str:
        return self.label or self.kind.value


CLUSTER_OPS: tuple[tuple[str | None, str], ...] = (
    (None, "/containers/json"),
    (None, "/images/json"),
    ("GET", "/volumes"),
    ("GET", "/networks"),
)
"""(method or any, exact path): answered by every node and merged."""

MANAGER_PREFIXES = ("/services", "/tasks", "/secrets", "/configs", "/swarm", "/info", "/nodes")
"""Swarm state lives on managers."""

MSG_NO_MANAGER = "The agent was unable to contact any other agent located on a manager node"
DETAILS_NO_MANAGER = "Unable to find an agent on any manager node"
MSG_NO_AGENT = "The agent was unable to contact any other agent"
DETAILS_NO_TARGET = "Unable to find the targeted agent"


def is_cluster_op(method: str, path: str) -> bool:
    return any((m is None or m == method) and p == path for m, p in CLUSTER_OPS)


def is_manager_op(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") or path.startswith(p + "?") for p in MANAGER_PREFIXES)


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), "")
    return value.strip()


def is_manager(member: Member, engine_managers: Collection[str] | None) -> bool:
    """A member is a manager when this node's engine counts it among the Swarm's managers; its own tag
    decides only when the engine's view is unknown or the member does not tell its node ID (a Go agent)."""
    if engine_managers is not None and member.node_id:
        return member.node_id in engine_managers
    return member.is_manager


def manager_candidates(self_member: Member, members: Sequence[Member],
                       engine_managers: Collection[str] | None = None) -> list[Member]:
    """The managers to try for a manager operation, leader first, then by name (pure)."""
    managers = [m for m in members if m.node_name != self_member.node_name and is_manager(m, engine_managers)]
    return sorted(managers, key=lambda m: (not m.is_leader, m.node_name))


def _manager_route(self_member: Member, members: Sequence[Member],
                   engine_managers: Collection[str] | None) -> DockerRoute:
    if self_member.is_manager:
        return DockerRoute(Kind.LOCAL, label="manager")
    candidates = manager_candidates(self_member, members, engine_managers)
    if not candidates:
        return DockerRoute(Kind.ERROR, status=500, message=MSG_NO_MANAGER, details=DETAILS_NO_MANAGER,
                           label="manager")
    return DockerRoute(Kind.PEER, member=candidates[0], label="manager", candidates=tuple(candidates))


def decide(
    method: str,
    path: str,
    headers: Mapping[str, str],
    self_member: Member,
    members: Sequence[Member],
    clustered: bool,
    engine_managers: Collection[str] | None = None,
) -> DockerRoute:
    """Route one Docker API request. `path` is the normalised path without version and query string.

    A FANOUT route with a member asks only that member, and still decorates its items with the node name."""
    if not clustered:
        return DockerRoute(Kind.LOCAL)
    target = _header(headers, HEADER_TARGET)
    if _header(headers, HEADER_MANAGER_OP):
        return _manager_route(self_member, members, engine_managers)
    if is_cluster_op(method, path):
        if target == self_member.node_name:
            return DockerRoute(Kind.LOCAL)
        if target:
            # Go fans out here too; naming a node means that node's answer, so we ask only it (its items
            # still carry the node name, as Go's merged answer does).
            member = find_member(list(members), target)
            if member is not None:
                return DockerRoute(Kind.FANOUT, member=member)
        return DockerRoute(Kind.FANOUT)
    if is_manager_op(path):
        return _manager_route(self_member, members, engine_managers)
    if not target or target == self_member.node_name:
        return DockerRoute(Kind.LOCAL)
    member = find_member(list(members), target)
    if member is None:
        return DockerRoute(Kind.ERROR, status=500, message=MSG_NO_AGENT, details=DETAILS_NO_TARGET)
    return DockerRoute(Kind.PEER, member=member)
