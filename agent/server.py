"""The agent's web application: middlewares (metrics, signature) and one dispatcher for every path.

Routing is decided by proxy.routing (pure); this module only wires the decision to the executors.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent import API_VERSION, PLATFORM_DOCKER, VERSION
from agent.appkeys import DOCKER, STATE
from agent.auth import HEADER_PUBLIC_KEY, HEADER_SIGNATURE, MSG_INVALID, MSG_MISSING, Verdict
from agent.cluster.membership import find_member
from agent.errors import Code, json_error
from agent.metrics import CONTENT_TYPE
from agent.state import AgentState
from proxy import fanout
from proxy.forward import relay
from proxy.routing import HEADER_TARGET, Api, ApiRoute, Kind, classify, decide, strip_version

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T0 = "keelson_t0"
_LABEL = "keelson_label"


def _agent_headers(response: web.StreamResponse) -> None:
    response.headers["Portainer-Agent"] = VERSION
    response.headers["Portainer-Agent-API-Version"] = API_VERSION
    response.headers["Portainer-Agent-Platform"] = PLATFORM_DOCKER


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    route: ApiRoute | None = request.get("api_route")
    if route is None or route.agent_headers:
        _agent_headers(response)
    t0 = request.get(_T0)
    if t0 is not None and not request.get("keelson_timed"):
        request["keelson_timed"] = True
        request.app[STATE].metrics.latency.labels(request.get(_LABEL, "unknown")).observe(
            time.perf_counter() - t0
        )


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request is measured: count by route kind/method/status, time to headers, in-flight."""
    metrics = request.app[STATE].metrics
    request[_T0] = time.perf_counter()
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(request.get(_LABEL, "unknown"), request.method, str(status)).inc()


@web.middleware
async def signature_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """PROTOCOL.md section 1: every route but /ping and /key carries a verified signature."""
    route = classify(request.method, request.path)
    request["api_route"] = route
    request[_LABEL] = route.api.value
    state = request.app[STATE]
    if not route.needs_signature:
        return await handler(request)
    if route.api is Api.HOST_INFO and _other_target(request, state):
        return await handler(request)  # the node that serves it checks the signature
    verdict = state.verifier.check(request.headers.get(HEADER_PUBLIC_KEY), request.headers.get(HEADER_SIGNATURE))
    if verdict is Verdict.OK:
        return await handler(request)
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


async def _to_peer(request: web.Request, state: AgentState, target: str) -> web.StreamResponse:
    member = find_member(state.members(), target)
    if member is None:
        return json_error(500, "The agent was unable to contact any other agent", Code.PROXY_TARGET_UNKNOWN,
                          details="Unable to find the targeted agent", target=target)
    upstream = state.peers.upstream(member.ip, member.agent_port)
    return await relay(request, upstream, state.metrics, {HEADER_TARGET: member.node_name},
                       Code.PROXY_PEER_UNREACHABLE)


async def _local_docker(request: web.Request, state: AgentState) -> web.StreamResponse:
    return await relay(request, state.engine, state.metrics, upgrades=("tcp",))


async def docker_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    route = decide(request.method, strip_version(request.path), request.headers, state.self_member,
                   state.members(), state.clustered)
    request[_LABEL] = route.metric_label
    if route.kind is Kind.LOCAL:
        return await _local_docker(request, state)
    if route.kind is Kind.PEER:
        assert route.member is not None
        return await _to_peer(request, state, route.member.node_name)
    if route.kind is Kind.FANOUT:
        return await fanout.handle(request, state)
    code = Code.PROXY_NO_MANAGER if route.label == "manager" else Code.PROXY_TARGET_UNKNOWN
    return json_error(route.status, route.message, code, details=route.details, path=request.path)


async def dispatch(request: web.Request) -> web.StreamResponse:
    """The single entry: agent endpoints first (PROTOCOL.md section 2.4), the Docker proxy for the rest."""
    route: ApiRoute = request["api_route"]
    state = request.app[STATE]
    api = route.api
    if api is Api.DOCKER:
        return await docker_proxy(request)
    if api is Api.PING:
        return web.Response(status=204)
    if api is Api.METRICS:
        return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
    if api is Api.AGENTS:
        from agent.api.agents import list_agents

        return await list_agents(request)
    if api is Api.KEY:
        from agent.api.key import handle_key

        return await handle_key(request)
    if api is Api.UNSUPPORTED:
        return json_error(501, "This agent serves Docker: Kubernetes and Nomad APIs are not available",
                          Code.BAD_REQUEST, path=request.path)
    if api is Api.NOT_FOUND:
        return json_error(404, f"No such agent endpoint: {request.method} {request.path}", Code.BAD_REQUEST)
    target = _other_target(request, state)
    if target:
        return await _to_peer(request, state, target)
    if api is Api.HOST_INFO:
        from agent.api.host import host_info

        return await host_info(request)
    if api is Api.BROWSE:
        from browse.handlers import handle_browse

        return await handle_browse(request, route.op, route.volume_id)
    if api is Api.WEBSOCKET:
        from agent.api.websocket import handle_websocket

        return await handle_websocket(request, route.op)
    if api is Api.DOCKERHUB:
        from agent.api.dockerhub import dockerhub_status

        return await dockerhub_status(request)
    return json_error(404, "Not found", Code.BAD_REQUEST)


def build_app(state: AgentState, extra_middlewares: list[Any] | None = None) -> web.Application:
    """The application; Edge mode adds its own middleware (key gate, activity tracking) after metrics."""
    app = web.Application(
        middlewares=[metrics_middleware, *(extra_middlewares or []), signature_middleware],
        client_max_size=0,  # bodies are streamed, never read whole by aiohttp
        handler_args={"max_field_size": 65536, "max_line_size": 65536},
    )
    app[STATE] = state
    app[DOCKER] = state.docker
    from browse.handlers import HOST_ROOT_KEY

    app[HOST_ROOT_KEY] = str(state.config.host_root)
    app.on_response_prepare.append(_on_prepare)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
