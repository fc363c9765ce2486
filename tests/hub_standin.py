"""Docker Hub's token service and registry on a test address (no test may reach the real ones)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class HubStandIn:
    """auth.docker.io + registry-1.docker.io on loopback, recording what the agent sent."""

    def __init__(self) -> None:
        self.token_status = 200
        self.limits_status = 200
        self.limit_headers: dict[str, str] = {"RateLimit-Limit": "100;w=21600",
                                              "RateLimit-Remaining": "76;w=21600"}
        self.seen_auth: list[str | None] = []
        self.seen_bearer: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_get("/token", self.token)
        self.app.router.add_route("HEAD", "/v2/ratelimitpreview/test/manifests/latest", self.manifest)

    async def token(self, request: web.Request) -> web.Response:
        assert request.query["service"] == "registry.docker.io"
        assert request.query["scope"] == "repository:ratelimitpreview/test:pull"
        self.seen_auth.append(request.headers.get("Authorization"))
        if self.token_status != 200:
            return web.json_response({"details": "nope"}, status=self.token_status)
        return web.json_response({"token": "tok-123"})

    async def manifest(self, request: web.Request) -> web.Response:
        self.seen_bearer.append(request.headers.get("Authorization"))
        return web.Response(status=self.limits_status, headers=self.limit_headers)


class ThreadedHub:
    """A HubStandIn served from its own thread and event loop, for agents that run as separate processes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.stand_in = HubStandIn()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ThreadedHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.stand_in.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server  # the bound port of port 0; aiohttp exposes it nowhere else
        assert server is not None and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def agent_env(self) -> dict[str, str]:
        return {"KEELSON_DOCKERHUB_AUTH_URL": self.url, "KEELSON_DOCKERHUB_REGISTRY_URL": self.url}
