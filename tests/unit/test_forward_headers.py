"""The forwarder sends the caller's headers, header for header: nothing that an HTTP client would add on its
own (Accept, Accept-Encoding, Content-Type, User-Agent), minus hop-by-hop headers, plus X-Forwarded-For; the
same over both upstream kinds (the engine's lean client and the peers' aiohttp session).
The upstream here is an echo server on loopback that answers with the headers it received."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.config import DockerEndpoint
from agent.metrics import Metrics
from proxy.forward import forward_http
from proxy.upstream import EngineUpstream, PeerPool, Upstream


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"headers": [[k, v] for k, v in request.headers.items()], "body": body.decode()})


@pytest.mark.parametrize("kind", ["engine", "peer"])
async def test_forwarded_headers_are_the_callers(kind: str, aiohttp_server: Callable[..., Any],
                                                 aiohttp_client: Callable[..., Any]) -> None:
    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", echo)
    server: TestServer = await aiohttp_server(upstream_app)
    assert server.port is not None
    upstream: Upstream
    if kind == "engine":
        engine = EngineUpstream(DockerEndpoint(url=f"tcp://127.0.0.1:{server.port}"))
        upstream, close = engine, engine.close
    else:
        pool = PeerPool(tls=False)
        upstream, close = pool.upstream("127.0.0.1", server.port), pool.close
    metrics = Metrics()

    async def relay(request: web.Request) -> web.StreamResponse:
        return await forward_http(request, upstream, request.raw_path, metrics)

    proxy_app = web.Application()
    proxy_app.router.add_route("*", "/{tail:.*}", relay)
    client: TestClient = await aiohttp_client(proxy_app, skip_auto_headers=("User-Agent", "Accept",
                                                                              "Accept-Encoding", "Content-Type"))
    try:
        resp = await client.post("/v1.41/x", data=b"raw", headers={"X-Registry-Auth": "abc", "Connection": "close",
                                                                   "X-Custom": "1"})
        got = await resp.json()
        names = [k.lower() for k, _ in got["headers"]]
        assert got["body"] == "raw"
        for added in ("accept", "accept-encoding", "content-type", "user-agent"):
            assert added not in names, (added, got["headers"])
        assert {"x-registry-auth", "x-custom", "x-forwarded-for", "host", "content-length"} == set(names)
    finally:
        await close()
