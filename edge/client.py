"""HTTP client for Portainer's Edge API, as the Go agent uses it (edge/client/portainer_edge_client.go).

* ``GET {url}/api/endpoints/{id}/edge/status`` with the agent headers and ``If-None-Match`` listing the ETags
  of the last 8 bodies (Go keeps an LRU of 8); a 304 carries one of them back and reuses that cached body.
* ``POST {url}/api/endpoints/global-key`` (body ``{}``) turns a global key (endpoint id 0) into an id.
* ``POST {url}/api/endpoints/{id}/edge/jobs/{jobId}/logs`` body ``{"FileContent": ...}`` sends a job's log.
* ``GET {url}/api/endpoints/{id}/edge/stacks/{stackId}?version=N`` fetches an Edge stack's files.
* ``PUT {url}/api/edge_stacks/{stackId}/status`` reports a stack's status on this environment.

TLS as in Go's client/build.go: EDGE_INSECURE_POLL skips verification; MTLS_SSL_CA replaces the system CAs;
MTLS_SSL_CERT/KEY are the client identity, reloaded when the files change (certificate rotation).
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import aiohttp

from agent import PLATFORM_DOCKER, VERSION
from edge.stacks.payload import StackRef, parse_stack_refs

HEADER_EDGE_ID = "X-PortainerAgent-EdgeID"
HEADER_AGENT = "Portainer-Agent"
HEADER_TIMEZONE = "X-PortainerAgent-TimeZone"
HEADER_PLATFORM = "Portainer-Agent-Platform"
HEADER_UPDATE_ID = "X-PortainerAgent-Update-ID"
ETAG_CACHE_SIZE = 8
DEFAULT_TIMEOUT = 30.0
MAX_BODY = 16 * 1024 * 1024
STATUS_IDLE = "IDLE"
STATUS_REQUIRED = "REQUIRED"
STATUS_ACTIVE = "ACTIVE"
STATUSES = (STATUS_IDLE, STATUS_REQUIRED, STATUS_ACTIVE)


class PollError(Exception):
    """A poll or Edge API call that did not give a usable answer; ``status`` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Schedule:
    """One Edge job as the poll response lists it (Portainer's edgeJobResponse)."""

    id: int
    cron_expression: str
    script: str
    """base64 (RawStd) of the script, as sent."""
    version: int
    collect_logs: bool = False


@dataclass(frozen=True)
class PollResponse:
    status: str
    port: int = 0
    schedules: tuple[Schedule, ...] = ()
    checkin: float = 0.0
    credentials: str = ""
    stacks: tuple[StackRef, ...] | None = None
    """None when the answer had no list (nothing is removed then); a list, even empty, is the whole truth."""
    dropped: tuple[str, ...] = field(default=(), compare=False)
    """Why schedule or stack entries were left out (malformed), for one log line each."""


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PollError(f"bad poll response: {name} is not an integer")
    return value


def parse_poll_response(body: bytes) -> PollResponse:
    """Validate the status body; a malformed schedule is dropped (and reported), anything else is an error."""
    try:
        data = json.loads(body)
    except ValueError:
        raise PollError(f"bad poll response: not JSON ({body[:80]!r})") from None
    if not isinstance(data, dict):
        raise PollError("bad poll response: not a JSON object")
    status = data.get("status")
    if status not in STATUSES:
        raise PollError(f"bad poll response: unknown status {status!r}")
    port = _int(data.get("port") or 0, "port")
    if not 0 <= port <= 65535:
        raise PollError(f"bad poll response: port {port} out of range")
    checkin = data.get("checkin") or 0
    if isinstance(checkin, bool) or not isinstance(checkin, int | float) or checkin < 0:
        raise PollError("bad poll response: checkin is not a non-negative number")
    credentials = data.get("credentials") or ""
    if not isinstance(credentials, str):
        raise PollError("bad poll response: credentials is not a string")
    raw_schedules = data.get("schedules") or []
    if not isinstance(raw_schedules, list):
        raise PollError("bad poll response: schedules is not a list")
    schedules: list[Schedule] = []
    dropped: list[str] = []
    for item in raw_schedules:
        try:
            if not isinstance(item, dict):
                raise PollError("not an object")
            cron, script = item.get("CronExpression"), item.get("Script", "")
            if not isinstance(cron, str) or not isinstance(script, str):
                raise PollError("CronExpression/Script are not strings")
            schedules.append(Schedule(_int(item.get("Id"), "Id"), cron, script,
                                      _int(item.get("Version") or 0, "Version"), bool(item.get("CollectLogs"))))
        except PollError as exc:
            dropped.append(f"schedule {str(item)[:80]}: {exc}")
    stacks, bad_stacks = parse_stack_refs(data.get("stacks"))
    return PollResponse(status, port, tuple(schedules), float(checkin), credentials, stacks,
                        tuple(dropped + bad_stacks))


def time_zone_name() -> str:
    """What Go's ``time.Local.String()`` gives: the TZ variable ("UTC" when empty), else "Local"."""
    tz = os.environ.get("TZ")
    if tz is None:
        return "Local"
    return tz or "UTC"


@dataclass(frozen=True)
class TlsFiles:
    cert: str = ""
    key: str = ""
    ca: str = ""
    insecure: bool = False

    def mtimes(self) -> tuple[float, ...]:
        out: list[float] = []
        for path in (self.cert, self.key, self.ca):
            try:
                out.append(os.stat(path).st_mtime if path else 0.0)
            except OSError:
                out.append(-1.0)
        return tuple(out)


def build_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS >= 1.2; the CA file replaces the system roots (as Go's RootCAs); client cert when given."""
    ctx = ssl.create_default_context(cafile=files.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if files.cert and files.key:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def _error_text(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and ("message" in data or "details" in data):
        return f"HTTP {status}: {data.get('message', '')}: {data.get('details', '')}"
    snippet = body[:120].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {snippet}" if snippet else "")


def global_key_payload(edge_groups: tuple[int, ...], tags: tuple[int, ...], environment_group: int) -> bytes:
    """The global-key request's body as the Go agent sends it (edge/client/portainer_edge_client.go): `{}`,
    or, when EDGE_GROUPS, PORTAINER_TAGS or PORTAINER_GROUP is set, its meta fields (empty lists as null,
    as Go marshals nil slices). CE's server ignores them; Business Edition's auto-onboarding uses them."""
    if not (edge_groups or tags or environment_group):
        return b"{}"
    return json.dumps({"edgeGroupsIds": list(edge_groups) or None, "tagsIds": list(tags) or None,
                       "environmentGroupId": environment_group}, separators=(",", ":")).encode()


class PortainerClient:
    """One aiohttp session towards the Portainer instance of the Edge key."""

    def __init__(self, url: str, edge_id: str, endpoint_id: int, *, update_id: int = 0,
                 tls: TlsFiles | None = None, timeout: float = DEFAULT_TIMEOUT,
                 edge_groups: tuple[int, ...] = (), tags: tuple[int, ...] = (), environment_group: int = 0) -> None:
        self.url = url.rstrip("/")
        self.meta = global_key_payload(edge_groups, tags, environment_group)
        self.edge_id = edge_id
        self.endpoint_id = endpoint_id
        self.update_id = update_id
        self.timeout = timeout
        self._tls = tls or TlsFiles()
        self._tls_mtimes: tuple[float, ...] = ()
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._etags: OrderedDict[str, PollResponse] = OrderedDict()

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """Current context; rebuilt when a certificate file changed since it was made (Go: certsNeedsRotation)."""
        mtimes = self._tls.mtimes()
        if self._ssl is None or mtimes != self._tls_mtimes:
            self._ssl = build_ssl_context(self._tls)
            self._tls_mtimes = mtimes
            if self._session is not None:
                # In-flight requests finish on the old session (closed at close()); new ones get the new context.
                self._retired.append(self._session)
                self._session = None
        return self._ssl

    def _http(self) -> aiohttp.ClientSession:
        ctx = self.ssl_context
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=4),
                                                  trust_env=True)
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout)

    async def close(self) -> None:
        for session in [*self._retired, self._session]:
            if session is not None:
                await session.close()
        self._retired.clear()
        self._session = None

    async def global_key(self) -> int:
        """The endpoint id Portainer has for our EDGE_ID (global keys)."""
        if not self.edge_id:
            raise PollError("EDGE_ID is not set: a global key cannot be resolved")
        headers = {HEADER_EDGE_ID: self.edge_id, "Content-Type": "application/json"}
        async with self._http().post(f"{self.url}/api/endpoints/global-key", data=self.meta, headers=headers,
                                     timeout=self._timeout()) as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise PollError(f"global key request failed: {_error_text(resp.status, body)}", resp.status)
        try:
            data = json.loads(body)
            endpoint_id = data["endpointID"]
        except (ValueError, KeyError, TypeError):
            raise PollError(f"global key request: unexpected body {body[:80]!r}") from None
        if isinstance(endpoint_id, bool) or not isinstance(endpoint_id, int) or endpoint_id <= 0:
            raise PollError(f"global key request: bad endpointID {endpoint_id!r}")
        return endpoint_id

    def status_headers(self) -> dict[str, str]:
        headers = {
            HEADER_AGENT: VERSION,
            HEADER_EDGE_ID: self.edge_id,
            HEADER_TIMEZONE: time_zone_name(),
            HEADER_PLATFORM: PLATFORM_DOCKER,
            HEADER_UPDATE_ID: str(self.update_id),
        }
        if self._etags:
            headers["If-None-Match"] = ",".join(self._etags)
        return headers

    async def status(self) -> PollResponse:
        url = f"{self.url}/api/endpoints/{self.endpoint_id}/edge/status"
        async with self._http().get(url, headers=self.status_headers(), timeout=self._timeout()) as resp:
            body = await resp.content.read(MAX_BODY)
            etag = resp.headers.get("ETag", "")
            status = resp.status
        if status == 304:
            cached = self._etags.get(etag)
            if cached is None:
                self._etags.clear()
                raise PollError(f"304 Not Modified for an unknown ETag {etag!r}", 304)
            self._etags.move_to_end(etag)
            return cached
        if status != 200:
            raise PollError(f"status request failed: {_error_text(status, body)}", status)
        parsed = parse_poll_response(body)
        if etag:
            self._etags[etag] = parsed
            self._etags.move_to_end(etag)
            while len(self._etags) > ETAG_CACHE_SIZE:
                self._etags.popitem(last=False)
        return parsed

    async def send_job_logs(self, job_id: int, content: str) -> None:
        url = f"{self.url}/api/endpoints/{self.endpoint_id}/edge/jobs/{job_id}/logs"
        headers = {HEADER_EDGE_ID: self.edge_id, "Content-Type": "application/json"}
        payload = json.dumps({"FileContent": content}).encode()
        async with self._http().post(url, data=payload, headers=headers, timeout=self._timeout()) as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise PollError(f"job log upload failed: {_error_text(resp.status, body)}", resp.status)

    async def edge_stack(self, stack_id: int, version: int) -> bytes:
        """The stack's payload (edge.StackPayload JSON); PollError for any answer but 200."""
        url = f"{self.url}/api/endpoints/{self.endpoint_id}/edge/stacks/{stack_id}"
        headers = {HEADER_EDGE_ID: self.edge_id}
        async with self._http().get(url, params={"version": str(version)}, headers=headers,
                                    timeout=self._timeout()) as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise PollError(f"fetching Edge stack {stack_id} failed: {_error_text(resp.status, body)}",
                                resp.status)
        return body

    async def set_stack_status(self, stack_id: int, status: int, error: str = "") -> None:
        """One status report (Go: SetEdgeStackStatus); PollError with the HTTP status when refused."""
        url = f"{self.url}/api/edge_stacks/{stack_id}/status"
        headers = {HEADER_EDGE_ID: self.edge_id, "X-Portainer-No-Body": "1", "Content-Type": "application/json"}
        payload = json.dumps({"Error": error, "Status": status, "EndpointID": self.endpoint_id,
                              "Time": int(time.time())}).encode()
        async with self._http().put(url, data=payload, headers=headers, timeout=self._timeout()) as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise PollError(f"status report of Edge stack {stack_id} failed: {_error_text(resp.status, body)}",
                                resp.status)
