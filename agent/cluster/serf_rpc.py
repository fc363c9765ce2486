"""A small asyncio client for the RPC port of a `serf agent` (see docs/cluster.md).

No PyPI client fits (sync sockets, Python 2, or a close() that sends `leave`), so this speaks the msgpack
protocol itself: request header + optional body out, response header + optional body back, matched by Seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from agent.tasks import spawn

log = logging.getLogger(__name__)

MEMBER_EVENTS = "member-join,member-leave,member-failed,member-update,member-reap"

Record = dict[str, Any]
RecordCallback = Callable[[Record], None]


class SerfRPCError(Exception):
    """The agent answered a request with a non-empty Error string (or the connection broke)."""


@dataclass(frozen=True)
class SerfMember:
    """One member as serf reports it, with Addr already decoded to text."""

    name: str
    addr: str
    port: int
    status: str
    tags: dict[str, str] = field(default_factory=dict)


def decode_addr(raw: object) -> str:
    """Serf sends net.IP raw: 4 bytes, or 16 bytes that may be a v4-mapped IPv4 address."""
    if isinstance(raw, str):
        return str(ipaddress.ip_address(raw)) if raw else ""
    if not isinstance(raw, bytes | bytearray) or not raw:
        return ""
    ip = ipaddress.ip_address(bytes(raw))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def decode_member(raw: Record) -> SerfMember:
    """Turn one `Members` item of a response or event record into a SerfMember."""
    return SerfMember(
        name=str(raw.get("Name", "")),
        addr=decode_addr(raw.get("Addr")),
        port=int(raw.get("Port", 0)),
        status=str(raw.get("Status", "")),
        tags={str(k): str(v) for k, v in (raw.get("Tags") or {}).items()},
    )


def _is_header(obj: object) -> bool:
    """Bodies never consist of exactly Seq and Error, so the shape tells headers and bodies apart."""
    return isinstance(obj, dict) and set(obj) == {"Seq", "Error"}


class SerfRPCClient:
    """One RPC connection. Never sends `leave`: that would shut the serf agent down."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request_timeout: float = 30.0
    ) -> None:
        self.request_timeout = request_timeout
        self._reader = reader
        self._writer = writer
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self._seq = 0
        self._pending: dict[int, tuple[asyncio.Future[Record | None], bool]] = {}
        self._streams: dict[int, RecordCallback] = {}
        # Where the next non-header object goes: a waiting request, a stream, or nowhere.
        self._body_for: asyncio.Future[Record | None] | RecordCallback | None = None
        self._write_lock = asyncio.Lock()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._read_task = spawn(self._read_loop(), "serf-rpc-reader", owned=True)

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        auth_key: str | None = None,
        handshake: bool = True,
    ) -> SerfRPCClient:
        """Open a connection and (by default) handshake and authenticate, as serf demands first."""
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            if handshake:
                await client.handshake()
            if auth_key:
                await client.auth(auth_key)
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Returns when the connection is gone, so a supervisor can react."""
        await asyncio.shield(self._closed)

    async def call(
        self, command: str, body: Record | None = None, *, expect_body: bool = False
    ) -> Record | None:
        """Send one request and wait for its response (body when ``expect_body``); errors raise.

        Local commands answer at once, so a missing answer within ``request_timeout`` means a stuck agent.
        """
        _, fut = await self._send(command, body, expect_body)
        return await asyncio.wait_for(fut, self.request_timeout)

    async def handshake(self, version: int = 1) -> None:
        await self.call("handshake", {"Version": version})

    async def auth(self, key: str) -> None:
        await self.call("auth", {"AuthKey": key})

    async def members(self) -> list[SerfMember]:
        body = await self.call("members", expect_body=True)
        return [decode_member(m) for m in (body or {}).get("Members") or []]

    async def join(self, addrs: list[str], replay: bool = False) -> int:
        """Serf answers with an error only when no address could be joined.

        Unbounded on purpose: serf tries each address in turn with its own TCP timeout; callers that need a
        limit wrap this in ``asyncio.timeout``.
        """
        _, fut = await self._send("join", {"Existing": addrs, "Replay": replay}, True)
        body = await fut
        return int((body or {}).get("Num", 0))

    async def tags(self, tags: dict[str, str] | None = None, delete: list[str] | None = None) -> None:
        """Merge ``tags`` into this agent's tags and drop ``delete``; serf gossips the result."""
        await self.call("tags", {"Tags": tags or {}, "DeleteTags": delete or []})

    async def stream(self, on_record: RecordCallback, event_types: str = MEMBER_EVENTS) -> int:
        """Subscribe; each record goes to ``on_record`` (e.g. ``queue.put_nowait``). Returns the Seq."""
        seq, fut = await self._send("stream", {"Type": event_types}, False, stream=on_record)
        try:
            await asyncio.wait_for(fut, self.request_timeout)
        except BaseException:
            self._streams.pop(seq, None)
            raise
        return seq

    async def stop(self, seq: int) -> None:
        self._streams.pop(seq, None)
        await self.call("stop", {"Stop": seq})

    async def close(self) -> None:
        """Drop the connection only: the agent keeps running and stays in the cluster."""
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SerfRPCError, OSError):
            await self._read_task
        self._writer.close()
        with contextlib.suppress(OSError):  # the agent may have dropped the connection first
            await self._writer.wait_closed()

    async def _send(
        self, command: str, body: Record | None, expect_body: bool, stream: RecordCallback | None = None
    ) -> tuple[int, asyncio.Future[Record | None]]:
        if self.closed:
            raise SerfRPCError("serf RPC connection is closed")
        seq = self._seq
        self._seq += 1
        fut: asyncio.Future[Record | None] = asyncio.get_running_loop().create_future()
        self._pending[seq] = (fut, expect_body)
        if stream is not None:
            self._streams[seq] = stream
        data = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            data += msgpack.packb(body)
        try:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._pending.pop(seq, None)
            self._streams.pop(seq, None)
            raise SerfRPCError(f"serf RPC write failed: {exc}") from exc
        return seq, fut

    async def _read_loop(self) -> None:
        reason = "serf RPC connection closed"
        try:
            while data := await self._reader.read(65536):
                self._unpacker.feed(data)
                for obj in self._unpacker:
                    self._dispatch(obj)
        except (OSError, ValueError) as exc:
            reason = f"serf RPC connection broken: {exc}"
        finally:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(SerfRPCError(reason))
            self._pending.clear()
            if not self._closed.done():
                self._closed.set_result(None)

    def _dispatch(self, obj: object) -> None:
        if _is_header(obj):
            assert isinstance(obj, dict)
            seq, error = obj["Seq"], obj["Error"]
            self._body_for = self._streams.get(seq)
            pending = self._pending.pop(seq, None)
            if pending is None:
                return
            fut, expect_body = pending
            if error:
                self._body_for = None  # e.g. join sends a body even on error: drop it
                self._streams.pop(seq, None)
                if not fut.done():
                    fut.set_exception(SerfRPCError(str(error)))
            elif expect_body:
                self._body_for = fut
            elif not fut.done():
                fut.set_result(None)
            return
        target, self._body_for = self._body_for, None
        record: Record = obj if isinstance(obj, dict) else {"Value": obj}
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_result(record)
        elif target is not None:
            try:
                target(record)
            except Exception:  # a broken consumer must not kill the connection
                log.exception("serf RPC stream callback failed")
