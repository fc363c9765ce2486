"""An asyncio transport over an aiohttp WebSocket, so a stream protocol (asyncssh) can run on top of it.

Chisel carries a plain byte stream in binary WebSocket messages with no framing of its own (jpillora/chisel
share/cnet/conn_ws.go): message boundaries mean nothing, so writes are coalesced and reads are handed on as
they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web

from agent.tasks import spawn

log = logging.getLogger(__name__)

MAX_FRAME = 256 * 1024
"""Largest message we send; receivers commonly cap messages (aiohttp's default limit is 4 MiB)."""

CLOSE_FLUSH_TIMEOUT = 5.0
"""How long close() may spend sending what is still buffered (an SSH disconnect) before giving up."""

WebSocket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse
_END_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class WebSocketTransport(asyncio.Transport):
    """Bytes written go out as binary messages; received messages go to ``protocol.data_received``.

    ``close`` and ``abort`` both flush what is buffered first (bounded by CLOSE_FLUSH_TIMEOUT) because
    asyncssh aborts right after queueing its disconnect message. ``protocol.connection_lost`` is called
    exactly once, when the WebSocket has ended for whichever reason.
    """

    def __init__(
        self, ws: WebSocket, protocol: asyncio.Protocol, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(extra)
        self._extra_info: dict[str, Any] = dict(extra or {})
        self._ws = ws
        self._protocol = protocol
        self._buffer = bytearray()
        self._wakeup = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._lost = False
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        """Set once the WebSocket is closed and connection_lost has been delivered."""

    def start(self) -> None:
        """Begin pumping; call after ``protocol.connection_made(self)``."""
        self._tasks = [
            spawn(self._read_loop(), "ws-transport-read"),
            spawn(self._write_loop(), "ws-transport-write"),
        ]

    # asyncio.Transport API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra_info:
            return self._extra_info[name]
        return self._ws.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._buffer += data
        self._wakeup.set()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._wakeup.set()

    def abort(self) -> None:
        self.close()

    # pumps

    async def _read_loop(self) -> None:
        exc: BaseException | None = None
        try:
            while True:
                await self._reading.wait()
                msg = await self._ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self._protocol.data_received(msg.data)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    self._protocol.data_received(msg.data.encode("utf-8"))
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    exc = self._ws.exception() or ConnectionError("WebSocket error")
                    break
                elif msg.type in _END_TYPES:
                    break
        except asyncio.CancelledError:
            pass
        except Exception as err:  # a broken socket must still end the protocol cleanly
            exc = err
        finally:
            self._closing = True
            self._wakeup.set()
            self._connection_lost(exc)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._buffer:
                    chunk = bytes(self._buffer[:MAX_FRAME])
                    del self._buffer[:MAX_FRAME]
                    if self._closing:
                        async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                            await self._ws.send_bytes(chunk)
                    else:
                        await self._ws.send_bytes(chunk)
                if self._closing:
                    break
        except (ConnectionError, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
            log.debug("WebSocket send failed: %s", exc)
        except asyncio.CancelledError:
            pass
        finally:
            self._closing = True
            self._buffer.clear()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self._ws.close()
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            self._protocol.connection_lost(exc if isinstance(exc, Exception) else None)
        finally:
            self.closed.set()
