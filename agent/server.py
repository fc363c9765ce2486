"""The agent's web application: one front middleware (guard, metrics, target), the signature check and one
dispatch table.

Routing is decided by proxy.routing (pure) on the target parsed once by proxy.target; this module only
wires each decision to its executor.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent import API_VERSION, PLATFORM_DOCKER, VERSION
from agent.api.agents import list_agents
from agent.api.dockerhub import DOCKERHUB_AUTH_URL, DOCKERHUB_REGISTRY_URL, dockerhub_status
from agent.api.host import host_info
from agent.api.key import handle_key
from agent.api.websocket import handle_websocket
from agent.appkeys import DOCKER, HOST_ROOT_KEY
from agent.auth import HEADER_PUBLIC_KEY, HEADER_SIGNATURE, MSG_INVALID, MSG_MISSING, Verdict
from agent.cluster.membership import Member, find_member
from agent.errors import Code, json_error
from agent.metrics import CONTENT_TYPE
from agent.state import AgentState
from browse.handlers import handle_browse
from proxy import fanout
from proxy.forward import UpstreamUnreachable, relay
from proxy.routing import HEADER_TARGET, MSG_NO_MANAGER, Api, ApiRoute, Kind, classify, decide
from proxy.target import BadTarget, Target, engine_version, parse_target

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE: web.AppKey[AgentState] = web.AppKey("state", AgentState)
"""The assembly's state; read here only, and handed to each handler as the explicit pieces it needs."""
_T0 = "keelson_t0"
_LABEL = "keelson_label"
GUARD = "keelson_guard"
TARGET = "keelson_target"
"""The request's parsed target (proxy.target.Target), set by front_middleware."""


def request_target(request: web.Request) -> Target:
    target: Target = request[TARGET]
    return target


AGENT_HEADERS = (("Portainer-Agent", VERSION), ("Portainer-Agent-API-Version", API_VERSION),
                 ("Portainer-Agent-Platform", PLATFORM_DOCKER))
"""What every answer but /key's carries (docs/protocol.md)."""
AGENT_HEADER_LINES = "".join(f"{name}: {value}\r\n" for name, value in AGENT_HEADERS)
"""The same as lines of a raw HTTP head (the lean front writes its heads itself)."""
MAX_LINE = 65536
"""The request line and each header field may hold this many bytes."""


def _agent_headers(response: web.StreamResponse) -> None:
    for name, value in AGENT_HEADERS:
        response.headers[name] = value


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    route: ApiRoute | None = request.get("api_route")
    if route is None or route.agent_headers:
        _agent_headers(response)
    t0 = request.get(_T0)
    if t0 is not None and not request.get("keelson_timed"):
        request["keelson_timed"] = True
        request.app[STATE].metrics.observe_latency(request.get(_LABEL, "unknown"), time.perf_counter() - t0)


@web.middleware
async def front_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request goes through first, in one layer: the connection guard learns that the request's
    head is complete (and when the request is over), the request is measured (count by route kind, method
    and status; time to headers; in flight), and its target is parsed once, so that everything after sees
    the normalised path (docs/protocol.md)."""
    state = request.app[STATE]
    guard = state.guard.guard_of(request.transport)
    if guard is not None:
        guard.request_started()
        request[GUARD] = guard
    metrics = state.metrics
    request[_T0] = time.perf_counter()
    metrics.in_flight.inc()
    status = 500
    try:
        try:
            target = parse_target(request.raw_path)
        except BadTarget as exc:
            request[_LABEL] = "error"
            response: web.StreamResponse = json_error(400, str(exc), Code.BAD_REQUEST,
                                                      target=request.raw_path[:200])
        else:
            request[TARGET] = target
            route = classify(request.method, target.route_path)
            request["api_route"] = route
            request[_LABEL] = route.api.value
            response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.in_flight.dec()
        metrics.request_done(request.get(_LABEL, "unknown"), request.method, status)
        if guard is not None:
            guard.request_finished()


def refuse_unsigned(request: web.Request, route: ApiRoute, state: AgentState) -> web.Response | None:
    """Every route but /ping and /key carries a verified signature (docs/protocol.md, "Signature"): the
    403 answer when this one does not, else None. Checked after any Edge middleware."""
    if not route.needs_signature:
        return None
    if route.api is Api.HOST_INFO and _other_target(request, state):
        return None  # the node that serves it checks the signature
    verdict = state.verifier.check(request.headers.get(HEADER_PUBLIC_KEY), request.headers.get(HEADER_SIGNATURE))
    if verdict is Verdict.OK:
        guard = request.get(GUARD)
        if guard is not None:
            guard.proven()
        return None
    state.metrics.signature_failures.labels(verdict.value).inc()
    if verdict is Verdict.MISSING:
        return json_error(403, MSG_MISSING, Code.AUTH_MISSING_SIGNATURE, details="Unauthorized",
                          path=request.path, remote=request.remote)
    code = Code.AUTH_KEY_MISMATCH if verdict is Verdict.KEY_MISMATCH else Code.AUTH_INVALID_SIGNATURE
    return json_error(403, MSG_INVALID, code, details="Unauthorized", path=request.path, remote=request.remote)


def _other_target(request: web.Request, state: AgentState) -> str:
    """The node named by X-PortainerAgent-Target when it is not this one (in a cluster), else ''."""
    target = request.headers.get(HEADER_TARGET, "").strip()
    if not state.clustered or not target or target == state.info.node_name:
        return ""
    return target


def local_path(request: web.Request, state: AgentState) -> str:
    """The path for this node's engine: the caller's API version, or the nearest one the engine supports."""
    return engine_path(request_target(request), state)


def engine_path(target: Target, state: AgentState) -> str:
    """`target` as this node's engine takes it: at the caller's API version, or the nearest one the engine
    supports (counted when adapted)."""
    version, adapted = engine_version(target, state.engine.api_range)
    if adapted:
        requested = target.version_tuple
        direction = "down" if requested is not None and state.engine.api_range is not None and \
            requested > state.engine.api_range.high else "up"
        state.metrics.api_version_adapted.labels(direction).inc()
    return target.forward_path(version)


async def _to_peer(request: web.Request, state: AgentState, node: str) -> web.StreamResponse:
    member = find_member(state.members(), node)
    if member is None:
        return json_error(500, "The agent was unable to contact any other agent", Code.PROXY_TARGET_UNKNOWN,
                          details="Unable to find the targeted agent", target=node)
    upstream = state.peers.upstream(member.ip, member.agent_port)
    # A peer receives the caller's own version: it adapts the request to its own engine.
    return await relay(request, upstream, request_target(request).as_sent, state.metrics,
                       {HEADER_TARGET: member.node_name}, Code.PROXY_PEER_UNREACHABLE)


MANAGER_HEAD_TIMEOUT = 5.0
"""A manager that took a GET but sends no answer head within this is taken for cut off (a kept-alive
connection to a node that vanished): the next manager is tried."""


async def _to_managers(request: web.Request, state: AgentState, candidates: tuple[Member, ...]) -> web.StreamResponse:
    """A manager operation: each live manager in turn (leader first), falling through to the next only
    when nothing of the request could be sent; the error names every manager tried."""
    health = state.health
    usable = [m for m in candidates if health is None or health.skipped(m.node_name) is None]
    ordered = usable + [m for m in candidates if m not in usable]  # skipped ones only as a last resort
    idempotent = request.method in ("GET", "HEAD") and not request.body_exists
    tried: list[str] = []
    for member in ordered:
        upstream = state.peers.upstream(member.ip, member.agent_port)
        try:
            return await relay(request, upstream, request_target(request).as_sent, state.metrics,
                               {HEADER_TARGET: member.node_name}, Code.PROXY_PEER_UNREACHABLE, fall_through=True,
                               head_timeout=MANAGER_HEAD_TIMEOUT if idempotent else None)
        except UpstreamUnreachable as exc:
            tried.append(f"{member.node_name} ({member.ip}): {exc}")
            if health is not None:
                health.failed(member.node_name, member.ip, member.agent_port, f"unreachable: {exc}")
    return json_error(500, MSG_NO_MANAGER, Code.PROXY_NO_MANAGER,
                      details="No manager answered; tried " + "; ".join(tried), path=request.path)


async def docker_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    target = request_target(request)
    route = decide(request.method, target.route_path, request.headers, state.self_member,
                   state.members(), state.clustered, state.engine_managers)
    request[_LABEL] = route.metric_label
    if route.kind is Kind.LOCAL:
        return await relay(request, state.engine, local_path(request, state), state.metrics, upgrades=("tcp",))
    if route.kind is Kind.PEER and route.candidates:
        return await _to_managers(request, state, route.candidates)
    if route.kind is Kind.PEER:
        assert route.member is not None
        return await _to_peer(request, state, route.member.node_name)
    if route.kind is Kind.FANOUT:
        return await fanout.handle(request, state, target, local_path(request, state), only=route.member)
    code = Code.PROXY_NO_MANAGER if route.label == "manager" else Code.PROXY_TARGET_UNKNOWN
    return json_error(route.status, route.message, code, details=route.details, path=request.path)


async def _ping(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def _metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _unsupported(request: web.Request) -> web.StreamResponse:
    return json_error(501, "This agent serves Docker: Kubernetes and Nomad APIs are not available",
                      Code.NOT_IMPLEMENTED, path=request.path)


async def _not_found(request: web.Request) -> web.StreamResponse:
    return json_error(404, f"No such agent endpoint: {request.method} {request.path}", Code.NOT_FOUND)


async def _method_not_allowed(request: web.Request) -> web.StreamResponse:
    return json_error(405, f"Method {request.method} is not allowed on {request_target(request).route_path}",
                      Code.METHOD_NOT_ALLOWED)


async def _browse(request: web.Request) -> web.StreamResponse:
    route: ApiRoute = request["api_route"]
    return await handle_browse(request, route.op, route.volume_id)


async def _websocket(request: web.Request) -> web.StreamResponse:
    route: ApiRoute = request["api_route"]
    state = request.app[STATE]
    return await handle_websocket(request, route.op, state.engine, state.metrics.hijacked,
                                  state.config.websocket_ping)


async def _agents(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return await list_agents(state.clustered, state.members(), state.self_member)


NODE_LOCAL: dict[Api, Handler] = {
    Api.HOST_INFO: host_info,
    Api.BROWSE: _browse,
    Api.WEBSOCKET: _websocket,
    Api.DOCKERHUB: dockerhub_status,
}
"""Agent endpoints served by the node that X-PortainerAgent-Target names (forwarded there when it is not us)."""

ANY_NODE: dict[Api, Handler] = {
    Api.DOCKER: docker_proxy,
    Api.PING: _ping,
    Api.METRICS: _metrics,
    Api.AGENTS: _agents,
    Api.KEY: handle_key,
    Api.UNSUPPORTED: _unsupported,
    Api.NOT_FOUND: _not_found,
    Api.METHOD_NOT_ALLOWED: _method_not_allowed,
}
"""Endpoints answered by whichever agent the caller reached."""


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The single entry: the signature is checked, then the route chosen by front_middleware picks the
    handler."""
    route: ApiRoute = request["api_route"]
    state = request.app[STATE]
    refused = refuse_unsigned(request, route, state)
    if refused is not None:
        return refused
    api = route.api
    handler = ANY_NODE.get(api)
    if handler is not None:
        return await handler(request)
    node = _other_target(request, state)
    if node:
        return await _to_peer(request, state, node)
    return await NODE_LOCAL[api](request)


def build_app(state: AgentState, extra_middlewares: list[Any] | None = None) -> web.Application:
    """The application; Edge mode adds its own middleware (key gate, activity tracking) after the front one,
    before the signature check."""
    app = web.Application(
        middlewares=[front_middleware, *(extra_middlewares or [])],
        client_max_size=0,  # bodies are streamed, never read whole by aiohttp
        # auto_decompress off: a body sent with Content-Encoding goes upstream byte for byte, as sent
        handler_args={"max_field_size": MAX_LINE, "max_line_size": MAX_LINE, "auto_decompress": False},
    )
    app[STATE] = state
    app[DOCKER] = state.docker
    app[HOST_ROOT_KEY] = str(state.config.host_root)
    app[DOCKERHUB_AUTH_URL] = state.config.dockerhub_auth_url
    app[DOCKERHUB_REGISTRY_URL] = state.config.dockerhub_registry_url
    app.on_response_prepare.append(_on_prepare)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
