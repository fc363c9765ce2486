"""Limits on client connections that hold before any signature is checked.

The API port faces every node of the Swarm (and the tunnel in Edge mode), so a client that never finishes
its request head must not be able to hold memory or descriptors. Each connection's protocol is wrapped in a
GuardedProtocol that counts the bytes of a request head until the application starts the request:

- a head must be complete within `head_timeout` of its first byte (or of the connection's start);
- a head may hold at most `max_head` bytes (431 above it; Go's net/http default is 1 MB);
- the unfinished heads of all connections together hold at most `head_budget` bytes: past it, the
  connection holding the most is closed;
- at most `max_unproven` connections that have not yet carried a verified signature are kept: a new one
  closes the oldest (so that an honest client, whose request completes at once, always gets in).

The application tells the guard when a request starts (its head is parsed), ends, and is signed, through
`guard_of(transport)`. Closures are counted by cause for the summarised refusal log.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
             b"Connection: close\r\nContent-Length: 51\r\n\r\n"
             b'{"message":"The request head is larger than 1 MiB"}')


class ConnectionGuard:
    """The shared limits and bookkeeping of every guarded connection of one listener."""

    def __init__(self, head_timeout: float = 30.0, max_head: int = 2**20, head_budget: int = 64 * 2**20,
                 max_unproven: int = 1024, on_close: Callable[[str], None] | None = None) -> None:
        self.on_close = on_close
        """Called with the cause each time a limit closes a connection (logs, metrics)."""
        self.head_timeout = head_timeout
        self.max_head = max_head
        self.head_budget = head_budget
        self.max_unproven = max_unproven
        self.pending_bytes = 0
        self._by_transport: dict[Any, GuardedProtocol] = {}
        self._unproven: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._pending: set[GuardedProtocol] = set()
        self.closed: Counter[str] = Counter()
        """Connections closed by a limit, by cause (head_timeout, head_too_large, head_budget, unproven_cap)."""

    def wrap(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], GuardedProtocol]:
        """A protocol factory whose protocols are guarded (for loop.create_server or a TLS layer)."""
        return lambda: GuardedProtocol(factory(), self)

    def guard_of(self, transport: Any) -> GuardedProtocol | None:
        """The guard of a connection, from the transport the application sees (TLS or plain)."""
        found = self._by_transport.get(transport)
        if found is None:
            # the application-side transport of TLS: the guard sits on the TCP transport below it
            found = self._by_transport.get(getattr(getattr(transport, "_ssl_protocol", None), "_transport", None))
        return found

    @property
    def connections(self) -> int:
        return len(self._by_transport)

    # -- bookkeeping used by GuardedProtocol -------------------------------------------------------

    def _opened(self, conn: GuardedProtocol) -> None:
        self._by_transport[conn.transport] = conn
        self._unproven[conn] = None
        while len(self._unproven) > self.max_unproven:
            oldest = next(iter(self._unproven))
            oldest.abort("unproven_cap")

    def _closed(self, conn: GuardedProtocol) -> None:
        self._by_transport.pop(conn.transport, None)
        self._unproven.pop(conn, None)
        self._pending.discard(conn)
        self.pending_bytes -= conn.head_bytes
        conn.head_bytes = 0

    def _grew(self, conn: GuardedProtocol, size: int) -> None:
        self._pending.add(conn)
        self.pending_bytes += size
        while self.pending_bytes > self.head_budget and self._pending:
            biggest = max(self._pending, key=lambda c: c.head_bytes)
            biggest.abort("head_budget")

    def _head_done(self, conn: GuardedProtocol) -> None:
        self._pending.discard(conn)
        self.pending_bytes -= conn.head_bytes
        conn.head_bytes = 0

    def _proven(self, conn: GuardedProtocol) -> None:
        self._unproven.pop(conn, None)


class GuardedProtocol(asyncio.BufferedProtocol):
    """Passes everything to the protocol it wraps (`inner`: TLS, or aiohttp's for plain HTTP), counting the
    bytes of request heads. It sits on the TCP connection, so a TLS handshake counts as part of the first
    head, and a hijacked stream (which replaces the protocol above TLS) is never counted."""

    def __init__(self, inner: asyncio.BaseProtocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: Any = None
        self.head_bytes = 0
        self.in_request = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None
        """When the unfinished head (or the connection, before its first) began; None between requests."""
        self._gone = False
        self._buffered = isinstance(inner, asyncio.BufferedProtocol)
        self._own_buffer = bytearray(0 if self._buffered else 2**16)

    # -- asyncio protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.guard._opened(self)
        self._head_since = self._loop.time()  # a new connection owes its first head from now
        self._arm(self._head_since)
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        if self._buffered:
            return self.inner.get_buffer(sizehint)  # type: ignore[attr-defined]
        return self._own_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._gone:
            return
        if not self.in_request:
            if self._head_since is None:
                self._head_since = self._loop.time()
                if self._timer is None:
                    self._arm(self._head_since)
            self.head_bytes += nbytes
            if self.head_bytes > self.guard.max_head:
                self.abort("head_too_large", TOO_LARGE)
                return
            self.guard._grew(self, nbytes)
            if self._gone:
                return
        if self._buffered:
            self.inner.buffer_updated(nbytes)  # type: ignore[attr-defined]
        else:
            self.inner.data_received(bytes(self._own_buffer[:nbytes]))  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard._closed(self)
        self.inner.connection_lost(exc)

    # -- what the application tells the guard ------------------------------------------------------

    def request_started(self) -> None:
        """The head of a request was parsed: its bytes no longer count, the body is the handler's business."""
        self.in_request = True
        self._head_since = None  # the timer stays: it finds no head pending when it fires (see _expired)
        self.guard._head_done(self)

    def request_finished(self) -> None:
        """The next bytes on this connection are the head of the next request (keep-alive)."""
        self.in_request = False

    def proven(self) -> None:
        """A request of this connection carried a verified signature: no longer evicted for newcomers."""
        self.guard._proven(self)

    # -- limits --------------------------------------------------------------------------------------

    def abort(self, cause: str, answer: bytes = b"") -> None:
        if self._gone:
            return
        self._gone = True
        self.guard.closed[cause] += 1
        if self.guard.on_close is not None:
            self.guard.on_close(cause)
        self._disarm()
        self.guard._closed(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if answer:
                transport.write(answer)
                transport.close()
            else:
                transport.abort()

    def _arm(self, since: float) -> None:
        """One timer per connection, re-armed lazily: a kept-alive connection's heads cost no timer each."""
        self._disarm()
        self._timer = self._loop.call_at(since + self.guard.head_timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        since = self._head_since
        if since is None:
            return  # no head pending: the next one's first bytes arm the timer again
        if self._loop.time() >= since + self.guard.head_timeout:
            self.abort("head_timeout")
        else:
            self._arm(since)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def unwrap_protocol(protocol: Any) -> Any:
    """The application's own protocol behind a guard (plain HTTP: the hijack takes over aiohttp's)."""
    return protocol.inner if isinstance(protocol, GuardedProtocol) else protocol
