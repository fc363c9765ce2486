"""Fan-out of the cluster listings (containers, images, volumes, networks) and the merge of the answers.

Every live member is asked at once (this node in-process, the others over the pooled peer sessions), each
with its own deadline. A node that fails or is late is left out and named in a response header (and in the
volumes `Warnings`); only when no node answers is the request an error.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from agent.bodylimit import BodyTooLarge, read_bounded, too_large
from agent.cluster.membership import Member
from agent.errors import Code, json_error, log_failure
from agent.metrics import Metrics
from agent.tasks import spawn
from proxy.forward import outgoing_headers
from proxy.health import PeerHealth
from proxy.routing import HEADER_TARGET
from proxy.target import Target
from proxy.upstream import EngineUpstream, PeerPool, PeerUpstream, Upstream

HEADER_FAILED_NODES = "X-Keelson-Failed-Nodes"


class FanoutConfig(Protocol):
    @property
    def fanout_timeout(self) -> float: ...


class Cluster(Protocol):
    """What a fan-out needs of the running agent (the assembly's AgentState has it): who is asked, how."""

    @property
    def self_member(self) -> Member: ...
    @property
    def engine(self) -> EngineUpstream: ...
    @property
    def peers(self) -> PeerPool: ...
    @property
    def health(self) -> PeerHealth | None: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def config(self) -> FanoutConfig: ...
    def members(self) -> list[Member]: ...


def loads(body: bytes) -> Any:
    """orjson parses a node's listing several times faster (bench/); json takes integers beyond 64 bits."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def dumps(data: Any) -> bytes:
    """Compact JSON bytes of the merged listing; json takes over where orjson refuses (huge integers)."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class NodeAnswer:
    node: str
    items: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    down: bool = False
    """It did not connect or answer in time (not merely an error answer): skipped for a while."""
    skipped: bool = False
    """Not asked at all: it failed recently and no probe has shown it back yet."""


def parse_node_body(node: str, status: int, body: bytes, volumes: bool) -> NodeAnswer:
    """Turn one node's answer into items (pure): an object with `message` is that node's error."""
    try:
        data = loads(body) if body else None
    except ValueError:
        return NodeAnswer(node, error=f"HTTP {status}: invalid JSON")
    if isinstance(data, dict) and "message" in data and status >= 300:
        return NodeAnswer(node, error=f"HTTP {status}: {data['message']}")
    if status != 200:
        return NodeAnswer(node, error=f"HTTP {status}")
    if volumes:
        if not isinstance(data, dict):
            return NodeAnswer(node, error="volumes answer is not an object")
        return NodeAnswer(node, items=list(data.get("Volumes") or []),
                          warnings=[str(w) for w in data.get("Warnings") or []])
    if not isinstance(data, list):
        return NodeAnswer(node, error="answer is not a JSON array")
    return NodeAnswer(node, items=data)


class MergedListing:
    """The merged answer, written node by node as the answers arrive, then each node's items dropped: the
    memory of a fan-out is bounded by the largest node's answer, not by the cluster's.

    Items are decorated with their node (`Portainer.Agent.NodeName`, replacing any such key, as Go does)
    and appear in the order the nodes answered (Go's order too). The bytes go to `out` (a spool)."""

    def __init__(self, volumes: bool, out: IO[bytes]) -> None:
        self.volumes = volumes
        self.out = out
        self.size = 0
        self.failed: dict[str, str] = {}
        self.warnings: list[str] = []
        self._empty = True
        self._write(b'{"Volumes":[' if volumes else b"[")

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.size += len(data)

    def add(self, answer: NodeAnswer) -> None:
        if answer.error is not None:
            self.failed[answer.node] = answer.error
            return
        decoration = {"Agent": {"NodeName": answer.node}}
        for item in answer.items:
            if isinstance(item, dict):
                item["Portainer"] = decoration
        if answer.items:
            inner = dumps(answer.items)[1:-1]  # one serialisation per node; its brackets dropped
            self._write(inner if self._empty else b"," + inner)
            self._empty = False
        self.warnings.extend(answer.warnings)
        answer.items = []  # written: this node's objects can go

    def finish(self) -> None:
        if not self.volumes:
            self._write(b"]")
            return
        warnings = self.warnings + [f"node {n} did not answer: {r}" for n, r in self.failed.items()]
        self._write(b'],"Warnings":' + dumps(warnings or None) + b"}")


def merge(answers: list[NodeAnswer], volumes: bool) -> tuple[Any, dict[str, str]]:
    """Concatenate in the given order, decorate each item with its node, collect failures (pure)."""
    out = io.BytesIO()
    listing = MergedListing(volumes, out)
    for answer in answers:
        listing.add(answer)
    listing.finish()
    return loads(out.getvalue()), listing.failed


async def reachable(ip: str, port: int, timeout: float) -> bool:
    """Whether a new TCP connection to the peer's agent port opens within `timeout` (a cheap liveness look)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(ip, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


BODIES_AT_ONCE = 4
"""Node answers read and being merged at one time: with the merged listing written as they come, a fan-out
holds at most this many node answers, whatever the size of the cluster."""
ASKED_AT_ONCE = 32
"""Node requests in flight at one time. Each open one holds a connection with its TLS and read buffers
(a good part of a node's answer waits there until its turn to be merged), so this, not the cluster's
size, bounds a fan-out's memory; the merge, one node at a time on the event loop, is the pace anyway."""
SPOOL_IN_MEMORY = 4 * 2**20
"""The merged listing stays in memory up to this size, then goes to a temporary file until it is sent."""


async def _ask(request: web.Request, upstream: Upstream, path_qs: str, member: Member, body: bytes | None,
               timeout: float, listing: MergedListing, gate: asyncio.Semaphore,
               slots: asyncio.Semaphore) -> NodeAnswer:
    async with slots:  # a node's deadline starts when its request goes out, not while it waits for a slot
        return await _ask_now(request, upstream, path_qs, member, body, timeout, listing, gate)


async def _ask_now(request: web.Request, upstream: Upstream, path_qs: str, member: Member, body: bytes | None,
                   timeout: float, listing: MergedListing, gate: asyncio.Semaphore) -> NodeAnswer:
    headers = outgoing_headers(request, {HEADER_TARGET: member.node_name})
    headers["Host"] = upstream.host_header
    headers.pop("Content-Length", None)

    async def call() -> NodeAnswer:
        async with await upstream.send(request.method, path_qs, headers, body) as resp:
            async with gate:  # back-pressure: the others wait in their sockets, not in our memory
                raw = await resp.read()
                answer = parse_node_body(member.node_name, resp.status, raw, listing.volumes)
                del raw
                listing.add(answer)  # synchronous: a node's items are in the listing whole, or not at all
                return answer

    task = spawn(call(), f"fanout-{member.node_name}", owned=True)
    try:
        started = asyncio.get_running_loop().time()
        look = upstream.connect_timeout
        if isinstance(upstream, PeerUpstream) and look is not None and look < timeout:
            # A request on a kept-alive connection to a node that was cut off would wait for the whole
            # answer deadline: if nothing came within a connect deadline, look whether the node is there
            # at all. A slow node that is there is waited for; a gone one costs this deadline, once.
            done, _ = await asyncio.wait({task}, timeout=look)
            if not done and not await reachable(upstream.ip, upstream.port, look):
                return NodeAnswer(member.node_name, error=f"no connection within {look:g}s", down=True)
        remaining = timeout - (asyncio.get_running_loop().time() - started)
        return await asyncio.wait_for(asyncio.shield(task), max(0.0, remaining))
    except TimeoutError:
        return NodeAnswer(member.node_name, error=f"no answer within {timeout:g}s", down=True)
    except (aiohttp.ClientError, OSError) as exc:
        return NodeAnswer(member.node_name, error=f"unreachable: {exc.__class__.__name__}: {exc}", down=True)
    finally:
        task.cancel()


async def _skipped(node: str, reason: str) -> NodeAnswer:
    return NodeAnswer(node, error=reason, skipped=True)


async def handle(request: web.Request, state: Cluster, target: Target, local_path: str,
                 only: Member | None = None) -> web.StreamResponse:
    """Ask every member (or `only` that one) and merge. This node's engine gets `local_path` (the caller's
    version adapted to it); peers get the caller's own version and adapt it for their engines."""
    volumes = target.route_path == "/volumes"
    try:
        body = await read_bounded(request) if request.body_exists else None
    except BodyTooLarge as exc:
        return too_large(exc, path=request.path)
    me = state.self_member
    health = state.health
    if only is not None:
        members = [only]
    else:
        members = [m for m in state.members() if m.node_name != me.node_name]
        members.insert(0, me)
        if health is not None:
            health.forget({m.node_name for m in members})
    listing = MergedListing(volumes, tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))
    gate = asyncio.Semaphore(BODIES_AT_ONCE)
    slots = asyncio.Semaphore(ASKED_AT_ONCE)
    jobs = []
    for member in members:
        upstream: Upstream
        if member.node_name == me.node_name:
            upstream, path_qs = state.engine, local_path
        else:
            reason = health.skipped(member.node_name) if health is not None else None
            if reason is not None:
                jobs.append(_skipped(member.node_name, reason))
                continue
            upstream, path_qs = state.peers.upstream(member.ip, member.agent_port), target.as_sent
        jobs.append(_ask(request, upstream, path_qs, member, body, state.config.fanout_timeout, listing, gate,
                         slots))
    try:
        answers = await asyncio.gather(*jobs)
        for answer in answers:
            if answer.skipped or answer.down:  # an answer that came (even an error) added itself in _ask
                listing.add(answer)
        listing.finish()
        return await _respond(request, state, listing, answers, members, me)
    finally:
        listing.out.close()


async def _respond(request: web.Request, state: Cluster, listing: MergedListing, answers: list[NodeAnswer],
                   members: list[Member], me: Member) -> web.StreamResponse:
    health = state.health
    by_name = {m.node_name: m for m in members}
    for answer in answers:
        asked = by_name.get(answer.node)
        if health is None or asked is None or asked.node_name == me.node_name or answer.skipped:
            continue
        if answer.down:
            health.failed(asked.node_name, asked.ip, asked.agent_port, answer.error or "down")
        else:
            health.answered(asked.node_name)
    failed = listing.failed
    for answer in answers:
        if answer.error is None or answer.skipped:
            continue
        state.metrics.fanout_node_failures.labels(answer.node).inc()
        log_failure(Code.FANOUT_NODE_FAILED, "node left out of a cluster listing", node=answer.node,
                    reason=answer.error, path=request.path)
    headers = {HEADER_FAILED_NODES: json.dumps(failed)} if failed else {}
    if failed and len(failed) == len(answers):
        return json_error(502, "No node of the cluster answered: " + "; ".join(
            f"{n}: {r}" for n, r in failed.items()), Code.FANOUT_ALL_FAILED, headers=headers)
    response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
    response.content_length = listing.size
    await response.prepare(request)
    listing.out.seek(0)
    while chunk := listing.out.read(2**16):
        await response.write(chunk)
    await response.write_eof()
    return response
