"""A stand-in for Portainer's Edge API, written from portainer/portainer (2.23) server source:

* ``GET /api/endpoints/{id}/edge/status`` (api/http/handler/endpointedge/endpointedge_status_inspect.go):
  check order: id not numeric -> 400; ``If-None-Match`` (comma list) containing the cached ETag -> 304 with that
  ETag (before any identity check); no heartbeat (unknown environment) -> 403; EdgeID header missing or not the
  recorded one -> 403 (security/bouncer.go AuthorizedEdgeEndpointOperation); heartbeat; not trusted -> 403
  (TrustedEdgeEnvironmentAccess); EdgeID recorded if empty, ``Portainer-Agent-Platform`` missing or not 1/2 ->
  400 "agent platform header is not valid"; the very first check-in opens the tunnel (snapshot) -> REQUIRED.
  200 body: compact JSON (segmentio encoder, no trailing newline, HTML characters escaped) in struct order
  status, port, schedules, checkin, credentials, stacks, with ``[]`` never null; ETag = lowercase hex of
  FNV-1a-32 over the body, cached per environment and dropped on every change (internal/edge/cache).
* Tunnels (api/chisel/tunnel.go): Open picks a port in [49152, 65535) that nothing answers on, an 8-character
  user and password, allows the user ``^R:0.0.0.0:<port>$`` on the chisel server and encrypts ``user:pass``
  with the environment's EdgeID; close only forgets the tunnel (its user removal cuts the encrypted text at ':'
  and so removes nobody, kept as is). Status is REQUIRED while open; ACTIVE can be forced by tests (CE never
  sends it).
* ``POST /api/endpoints/global-key`` (endpoints/endpoint_create_global_key.go): 400 without EdgeID, 200
  ``{"endpointID":N}`` for a known EdgeID, else 404.
* ``POST /api/endpoints/{id}/edge/jobs/{jobID}/logs`` (endpointedge/endpointedge_job_logs.go, behind
  middlewares.WithEndpoint): bad id 400, unknown 404, EdgeID check 403, bad job id 400, bad JSON 400, unknown
  job 404; stores FileContent, sets CollectLogs false / LogsStatus collected, drops the cache, answers ``null``.
* ``GET /api/endpoints/{id}/edge/stacks/{stackId}`` (endpointedge/endpointedge_stack_inspect.go, behind
  middlewares.WithEndpoint): bad id 400, unknown environment 404, EdgeID check 403, bad stack id 400, unknown
  stack 404 (relation not checked); 200 ``edge.StackPayload`` (api/edge/edge.go) in field order, CE's values:
  Name, EntryFileName, DirEntries of the entry file and the ``.env`` beside it (api/filesystem/serialize.go,
  files 0600 = 384), StackFileContent only for agents older than 2.19.0, Namespace "default", the rest zero.
* ``PUT /api/edge_stacks/{id}/status`` (edgestacks/edgestack_status_update.go): bad id 400; payload without
  Status, with EndpointID 0, or Error status without Error text 400; unknown stack 200 ``null``; unknown
  environment 404; EdgeID check 403; else the status is appended to the environment's list (Removed deletes
  the environment's entry) with Time 0 taken as now, and the stack answers 200.
  A stack update (edgestacks/utils_update_stack_version.go) bumps Version and empties every status list.
* Errors are libhttp's ``{"message","details"}`` with the details' first letter capitalised.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import ssl
import string
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from edge.credentials import encrypt_credentials
from tests.edge.chisel_server import ChiselTestServer

MIN_PORT, MAX_PORT = 49152, 65535


def _route_int(request: web.Request, name: str, message: str, prefix: str = "", suffix: str = ""
               ) -> int | web.Response:
    """A numeric route variable, or Portainer's 400 (libhttp's RetrieveNumericRouteVariableValue) for one that is
    not a number; ``prefix``/``suffix`` wrap the strconv error as the handler's own message does."""
    raw = request.match_info[name]
    try:
        return int(raw, 10)
    except ValueError:
        return http_error(400, message, f'{prefix}strconv.Atoi: parsing "{raw}": invalid syntax{suffix}')


def _endpoint_id(request: web.Request) -> int | web.Response:
    """The route's environment id, or Portainer's 400 for one that is not a number."""
    return _route_int(request, "id", "Invalid environment identifier route variable")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999
STATUS_IDLE, STATUS_REQUIRED, STATUS_ACTIVE = "IDLE", "REQUIRED", "ACTIVE"
LOGS_PENDING, LOGS_COLLECTED = 1, 2
UNTRUSTED = "Permission denied to access environment. The device has not been trusted yet"


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def go_json(value: Any) -> bytes:
    """encoding/json-compatible compact output: HTML characters and U+2028/2029 escaped, no newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                      ("\u2029", "\\u2029")):
        text = text.replace(char, esc)
    return text.encode()


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def http_error(status: int, message: str, err: str | None = None) -> web.Response:
    details = capitalize(err if err is not None else message)
    body: dict[str, str] = {}
    if message:
        body["message"] = message
    if details:
        body["details"] = details
    return web.Response(status=status, body=go_json(body), content_type="application/json")


def _random_text(n: int = 8) -> str:
    alphabet = string.ascii_letters + string.digits  # dchest/uniuri's StdChars
    return "".join(random.SystemRandom().choice(alphabet) for _ in range(n))


def raw_b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


@dataclass
class Endpoint:
    id: int
    name: str
    edge_id: str = ""
    """Recorded EdgeID: empty until the first trusted check-in unless pre-set."""
    trusted: bool = True
    last_checkin: int = 0
    """0 = never checked in: the next trusted check-in opens the tunnel (initial snapshot)."""
    agent_version: str = ""
    platform: int = 0
    heartbeat: float = 0.0


@dataclass
class Tunnel:
    status: str
    port: int
    user: str
    password: str
    credentials: str


@dataclass
class JobMeta:
    collect_logs: bool = False
    logs_status: int = 0


@dataclass
class EdgeJob:
    id: int
    cron: str
    script: bytes
    version: int = 1
    endpoints: dict[int, JobMeta] = field(default_factory=dict)


@dataclass
class EdgeStack:
    id: int
    name: str
    files: dict[str, bytes]
    """Project files by relative path (what Portainer stored from the editor: the entry file, maybe .env)."""
    entry_file: str = "docker-compose.yml"
    version: int = 1
    endpoints: set[int] = field(default_factory=set)
    status: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """Per environment, the reports as CE stores them: {"Type", "Error", "Time"}."""


@dataclass
class PollRecord:
    path: str
    headers: dict[str, str]
    status: int
    at: float
    peer: str = ""
    """The address the poll came from."""


class PortainerStandin:
    def __init__(self, chisel: ChiselTestServer | None = None, checkin: int = 5,
                 trust_on_first_connect: bool = False, tunnel_user: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.chisel = chisel
        self.host = host
        """Where it listens: loopback, or a test network's own address (agents in namespaces)."""
        self.tunnel_user = tunnel_user
        """Test knob for the ssh transport: hand out this user (an account of the test sshd) instead of a
        random one."""
        self.checkin = checkin
        self.trust_on_first_connect = trust_on_first_connect
        self.endpoints: dict[int, Endpoint] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.jobs: dict[int, EdgeJob] = {}
        self.stacks: dict[int, EdgeStack] = {}
        self.stack_fetches: list[tuple[int, int, str]] = []
        """(environment, stack, query string) of every stack fetch that was answered 200."""
        self.stack_reports: list[tuple[int, int, int, str]] = []
        """(stack, environment, Status, Error) of every status report that was accepted."""
        self.cache: dict[int, str] = {}
        self.polls: list[PollRecord] = []
        self.logs: list[tuple[int, int, str]] = []
        self.global_key_requests: list[dict[str, str]] = []
        self.global_key_bodies: list[bytes] = []
        """CE ignores the body (endpoints/endpoint_create_global_key.go); kept to check what the agent sent."""
        self.port = 0
        self.tls = False
        self._runner: web.AppRunner | None = None

    # --- server ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host`` (the same port again after stop(), so agents find it back)."""
        self.tls = ssl_context is not None
        app = web.Application()
        app.router.add_get("/api/endpoints/{id}/edge/status", self._status)
        app.router.add_post("/api/endpoints/global-key", self._global_key)
        app.router.add_post("/api/endpoints/{id}/edge/jobs/{jobID}/logs", self._job_logs)
        app.router.add_get("/api/endpoints/{id}/edge/stacks/{stackId}", self._stack_inspect)
        app.router.add_put("/api/edge_stacks/{id}/status", self._stack_status)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context,
                          reuse_address=True).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Portainer down: nothing listens on its port any more (state is kept for start())."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- test controls -----------------------------------------------------------------------------------

    def add_endpoint(self, endpoint_id: int, edge_id: str = "", trusted: bool = True,
                     checked_in: bool = False) -> Endpoint:
        ep = Endpoint(endpoint_id, f"edge-{endpoint_id}", edge_id, trusted,
                      int(time.time()) if checked_in else 0, heartbeat=time.time())
        self.endpoints[endpoint_id] = ep
        return ep

    def key_for(self, endpoint_id: int, fingerprint: str | None = None, tunnel_addr: str | None = None) -> str:
        """The Edge key Portainer shows for an environment (api/chisel/key.go), base64 RawStd."""
        assert self.chisel is not None or (fingerprint and tunnel_addr)
        fp = fingerprint if fingerprint is not None else self.chisel.fingerprint  # type: ignore[union-attr]
        addr = tunnel_addr or f"127.0.0.1:{self.chisel.port}"  # type: ignore[union-attr]
        return raw_b64(f"{self.url}|{addr}|{fp}|{endpoint_id}".encode())

    def set_status(self, endpoint_id: int, status: str) -> Tunnel | None:
        """IDLE closes the tunnel, REQUIRED opens one (if none), ACTIVE marks an open one as in use."""
        if status == STATUS_IDLE:
            self.close_tunnel(endpoint_id)
            return None
        tunnel = self.open_tunnel(self.endpoints[endpoint_id])
        if tunnel is not None and status == STATUS_ACTIVE:
            tunnel.status = STATUS_ACTIVE
            self.cache.pop(endpoint_id, None)
        return tunnel

    def open_tunnel(self, ep: Endpoint) -> Tunnel | None:
        """chisel/tunnel.go Open (errors are only logged by its callers)."""
        if ep.id == 0 or not ep.edge_id or not ep.trusted:
            return None
        if ep.id in self.tunnels:
            return self.tunnels[ep.id]
        self.cache.pop(ep.id, None)
        port = self._unused_port()
        user, password = self.tunnel_user or _random_text(), _random_text()
        if self.chisel is not None:
            self.chisel.users[user] = (password, f"^R:0.0.0.0:{port}$")
        tunnel = Tunnel(STATUS_REQUIRED, port, user, password, encrypt_credentials(user, password, ep.edge_id))
        self.tunnels[ep.id] = tunnel
        return tunnel

    def close_tunnel(self, endpoint_id: int) -> None:
        tunnel = self.tunnels.pop(endpoint_id, None)
        if tunnel is None:
            return
        if self.chisel is not None:  # as tunnel.go close: the cut of the encrypted text names no user
            self.chisel.users.pop(tunnel.credentials.partition(":")[0], None)
        self.cache.pop(endpoint_id, None)

    def _unused_port(self) -> int:
        # Here Portainer's tunnel server shares loopback with the agent, whose own outgoing connections take
        # ephemeral ports: a port the kernel may hand out as a connection's source would make the reverse
        # listener fail to bind. Stay within Portainer's range but above the ephemeral one.
        low = max(MIN_PORT, _ephemeral_range()[1] + 1)
        if low >= MAX_PORT:
            low = MIN_PORT
        while True:
            port = random.randrange(low, MAX_PORT)
            if any(t.port == port for t in self.tunnels.values()):
                continue
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    continue
            return port

    def add_job(self, job_id: int, cron: str, script: bytes, endpoint_ids: list[int]) -> EdgeJob:
        job = EdgeJob(job_id, cron, script, endpoints={eid: JobMeta() for eid in endpoint_ids})
        self.jobs[job_id] = job
        for eid in endpoint_ids:
            self.cache.pop(eid, None)
        return job

    def update_job(self, job_id: int, *, cron: str | None = None, script: bytes | None = None) -> EdgeJob:
        job = self.jobs[job_id]
        if cron is not None:
            job.cron = cron
        if script is not None:
            job.script = script
        job.version += 1
        for eid in job.endpoints:
            self.cache.pop(eid, None)
        return job

    def remove_job(self, job_id: int) -> None:
        job = self.jobs.pop(job_id)
        for eid in job.endpoints:
            self.cache.pop(eid, None)

    def add_stack(self, stack_id: int, name: str, compose: str, endpoint_ids: list[int],
                  env_file: str | None = None) -> EdgeStack:
        files = {"docker-compose.yml": compose.encode()}
        if env_file is not None:
            files[".env"] = env_file.encode()
        stack = EdgeStack(stack_id, name, files, endpoints=set(endpoint_ids))
        self.stacks[stack_id] = stack
        self._drop_caches(stack.endpoints)
        return stack

    def update_stack(self, stack_id: int, compose: str) -> EdgeStack:
        """utils_update_stack_version.go: new file, Version + 1, every environment's status list emptied."""
        stack = self.stacks[stack_id]
        stack.files[stack.entry_file] = compose.encode()
        stack.version += 1
        stack.status = {eid: [] for eid in stack.status}
        self._drop_caches(stack.endpoints)
        return stack

    def unassign_stack(self, stack_id: int, endpoint_id: int) -> None:
        """The environment leaves the stack's edge groups: the stack is no longer in its poll answer."""
        self.stacks[stack_id].endpoints.discard(endpoint_id)
        self._drop_caches({endpoint_id})

    def delete_stack(self, stack_id: int) -> None:
        stack = self.stacks.pop(stack_id)
        self._drop_caches(stack.endpoints)

    def reports(self, stack_id: int, endpoint_id: int) -> list[int]:
        """Every accepted status report of the stack from the environment, in order (Removed included)."""
        return [st for sid, eid, st, _ in self.stack_reports if sid == stack_id and eid == endpoint_id]

    def report_errors(self, stack_id: int, endpoint_id: int) -> list[str]:
        return [err for sid, eid, st, err in self.stack_reports if sid == stack_id and eid == endpoint_id and st == 2]

    def _drop_caches(self, endpoint_ids: set[int] | list[int]) -> None:
        for eid in endpoint_ids:
            self.cache.pop(eid, None)

    def request_logs(self, job_id: int, endpoint_id: int) -> None:
        """edgejobs/edgejob_tasklogs_collect.go: CollectLogs on, status pending, cache dropped."""
        self.jobs[job_id].endpoints[endpoint_id] = JobMeta(True, LOGS_PENDING)
        self.cache.pop(endpoint_id, None)

    def logs_for(self, job_id: int, endpoint_id: int) -> list[str]:
        return [content for eid, jid, content in self.logs if eid == endpoint_id and jid == job_id]

    def polls_for(self, endpoint_id: int, status: int | None = None) -> list[PollRecord]:
        path = f"/api/endpoints/{endpoint_id}/edge/status"
        return [p for p in self.polls if p.path == path and (status is None or p.status == status)]

    # --- handlers ----------------------------------------------------------------------------------------

    def _record(self, request: web.Request, response: web.Response) -> web.Response:
        self.polls.append(PollRecord(request.path, dict(request.headers), response.status, time.monotonic(),
                                     request.remote or ""))
        return response

    async def _status(self, request: web.Request) -> web.Response:
        return self._record(request, self._status_inner(request))

    def _status_inner(self, request: web.Request) -> web.Response:
        endpoint_id = _endpoint_id(request)
        if isinstance(endpoint_id, web.Response):
            return endpoint_id
        cached = self._from_cache(request, endpoint_id)
        if cached is not None:
            return cached
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return http_error(403, UNTRUSTED,
                              f"unable to retrieve endpoint heartbeat. Environment ID: {endpoint_id}")
        first_conn = ep.last_checkin == 0
        edge_id = request.headers.get("X-PortainerAgent-EdgeID", "")
        if not edge_id:
            return http_error(403, UNTRUSTED, f"unauthorized Edge endpoint operation: missing Edge identifier. "
                                              f"Environment name: {ep.name}")
        if ep.edge_id and ep.edge_id != edge_id:
            return http_error(403, UNTRUSTED, f"unauthorized Edge endpoint operation: invalid Edge identifier. "
                                              f"Environment name: {ep.name}")
        ep.heartbeat = time.time()
        if not ep.trusted and not self.trust_on_first_connect:
            return http_error(403, UNTRUSTED, f"untrusted Edge environment access: the device has not been "
                                              f"trusted yet. Environment name: {ep.name}")
        ep.edge_id = ep.edge_id or edge_id
        platform_err = self._platform_error(request.headers.get("Portainer-Agent-Platform", ""))
        if platform_err:
            return http_error(400, "agent platform header is not valid",
                              f"edge polling error: {platform_err}. Environment name: {ep.name}")
        ep.platform = int(request.headers["Portainer-Agent-Platform"])
        ep.agent_version = request.headers.get("Portainer-Agent", "")
        if first_conn:
            self.open_tunnel(ep)
        ep.last_checkin = int(time.time())
        tunnel = self.tunnels.get(ep.id)
        body = go_json({
            "status": tunnel.status if tunnel else STATUS_IDLE,
            "port": tunnel.port if tunnel else 0,
            "schedules": self._schedules(ep.id),
            "checkin": self.checkin,
            "credentials": tunnel.credentials if tunnel else "",
            "stacks": [{"ID": st.id, "Version": st.version} for st in self.stacks.values()
                       if ep.id in st.endpoints],
        })
        etag = format(fnv1a32(body), "x")
        self.cache[ep.id] = etag
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    @staticmethod
    def _platform_error(header: str) -> str:
        if header == "":
            return "agent platform header is missing"
        try:
            value = int(header)
        except ValueError:
            return f'strconv.Atoi: parsing "{header}": invalid syntax'
        if value not in (1, 2):
            return f"agent platform {value} is not valid"
        return ""

    def _from_cache(self, request: web.Request, endpoint_id: int) -> web.Response | None:
        header = request.headers.get("If-None-Match", "")
        etags = header.split(",")
        if not header or etags[0] == "":
            return None
        cached = self.cache.get(endpoint_id)
        if cached is None:
            return None
        for etag in etags:
            if etag == cached:
                if endpoint_id in self.endpoints:
                    self.endpoints[endpoint_id].heartbeat = time.time()
                return web.Response(status=304, headers={"ETag": etag})
        return None

    def _schedules(self, endpoint_id: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for job in self.jobs.values():
            meta = job.endpoints.get(endpoint_id)
            if meta is None:
                continue
            out.append({"Id": job.id, "CollectLogs": meta.collect_logs, "CronExpression": job.cron,
                        "Script": raw_b64(job.script), "Version": job.version})
        return out

    async def _global_key(self, request: web.Request) -> web.Response:
        self.global_key_requests.append(dict(request.headers))
        self.global_key_bodies.append(await request.read())
        edge_id = request.headers.get("X-PortainerAgent-EdgeID", "")
        if not edge_id:
            return http_error(400, "Invalid Edge ID", "the Edge ID cannot be empty")
        for ep in self.endpoints.values():
            if ep.edge_id == edge_id:
                return web.Response(body=go_json({"endpointID": ep.id}), content_type="application/json")
        return http_error(404, "Unable to find the endpoint in the database")

    async def _job_logs(self, request: web.Request) -> web.Response:
        ep = self._edge_endpoint(request)
        if isinstance(ep, web.Response):
            return ep
        endpoint_id = ep.id
        job_id = _route_int(request, "jobID", "Invalid edge job identifier route variable",
                            "invalid Edge job route variable: ", f". Environment name: {ep.name}")
        if isinstance(job_id, web.Response):
            return job_id
        try:
            payload = json.loads(await request.read())
            content = payload.get("FileContent", "") if isinstance(payload, dict) else None
            if not isinstance(content, str):
                raise ValueError("FileContent is not a string")
        except ValueError as exc:
            return http_error(400, "Invalid request payload",
                              f"invalid Edge job request payload: {exc}. Environment name: {ep.name}")
        job = self.jobs.get(job_id)
        if job is None:
            return http_error(404, "Unable to find an edge job with the specified identifier inside the database",
                              f"edge polling error: object not found inside the database. Environment name: "
                              f"{ep.name}")
        self.logs.append((endpoint_id, job_id, content))
        job.endpoints[endpoint_id] = JobMeta(False, LOGS_COLLECTED)
        self.cache.pop(endpoint_id, None)
        return web.Response(body=b"null", content_type="application/json")

    # --- Edge stacks ---------------------------------------------------------------------------------------

    def _edge_endpoint(self, request: web.Request, endpoint_id: int | None = None) -> Endpoint | web.Response:
        """middlewares.WithEndpoint + bouncer.AuthorizedEdgeEndpointOperation (job logs, stack fetches; the
        status update names its environment in the body)."""
        if endpoint_id is None:
            from_route = _endpoint_id(request)
            if isinstance(from_route, web.Response):
                return from_route
            endpoint_id = from_route
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return http_error(404, "Unable to find an environment with the specified identifier inside the database",
                              "object not found inside the database")
        edge_id = request.headers.get("X-PortainerAgent-EdgeID", "")
        if not edge_id or (ep.edge_id and ep.edge_id != edge_id):
            return http_error(403, "Permission denied to access environment",
                              f"unauthorized edge endpoint operation: {'missing' if not edge_id else 'invalid'} "
                              f"Edge identifier. Environment name: {ep.name}")
        return ep

    async def _stack_inspect(self, request: web.Request) -> web.Response:
        ep = self._edge_endpoint(request)
        if isinstance(ep, web.Response):
            return ep
        stack_id = _route_int(request, "stackId", "Invalid edge stack identifier route variable")
        if isinstance(stack_id, web.Response):
            return stack_id
        stack = self.stacks.get(stack_id)
        if stack is None:
            return http_error(404, "Unable to find an edge stack with the specified identifier inside the database",
                              "object not found inside the database")
        entries = []
        for name in (stack.entry_file, ".env"):  # serialize.go FilterDirForEntryFile: the entry and its .env
            if name in stack.files:
                entries.append({"Name": name, "Content": base64.b64encode(stack.files[name]).decode(),
                                "IsFile": True, "Permissions": 0o600})
        legacy = not ep.agent_version or tuple(int(x) for x in ep.agent_version.split(".")[:3] if x.isdigit()) < (2, 19)
        self.stack_fetches.append((ep.id, stack_id, request.query_string))
        return web.Response(body=go_json({
            "ID": 0, "Name": stack.name,
            "StackFileContent": stack.files[stack.entry_file].decode() if legacy else "",
            "DirEntries": entries, "EntryFileName": stack.entry_file, "Namespace": "default", "Version": 0,
            "RollbackTo": None, "RegistryCredentials": None, "PrePullImage": False, "RePullImage": False,
            "RetryDeploy": False, "EdgeUpdateID": 0, "SupportRelativePath": False, "FilesystemPath": "",
            "EnvVars": None, "ReadyRePullImage": False,
        }), content_type="application/json")

    async def _stack_status(self, request: web.Request) -> web.Response:
        stack_id = _route_int(request, "id", "Invalid stack identifier route variable")
        if isinstance(stack_id, web.Response):
            return stack_id
        try:
            payload = json.loads(await request.read())
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return http_error(400, "Invalid request payload", str(exc))
        status, endpoint_id, error = payload.get("Status"), payload.get("EndpointID") or 0, payload.get("Error", "")
        if status is None:
            return http_error(400, "Invalid request payload", "Invalid status")
        if not endpoint_id:
            return http_error(400, "Invalid request payload", "Invalid EnvironmentID")
        if status == 2 and not error:
            return http_error(400, "Invalid request payload", "Error message is mandatory when status is error")
        stack = self.stacks.get(stack_id)
        if stack is None:
            return web.Response(body=b"null", content_type="application/json")
        ep = self._edge_endpoint(request, endpoint_id)
        if isinstance(ep, web.Response):
            return ep
        self.stack_reports.append((stack_id, endpoint_id, status, error))
        if status == 4:
            stack.status.pop(endpoint_id, None)
        else:
            stack.status.setdefault(endpoint_id, []).append(
                {"Type": status, "Error": error, "Time": payload.get("Time") or int(time.time())})
        return web.Response(body=go_json({"Id": stack.id, "Name": stack.name, "Version": stack.version}),
                            content_type="application/json")
