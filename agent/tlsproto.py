"""A TLS protocol for asyncio that allows half-closed connections, as Go's crypto/tls does.

asyncio's SSLProtocol tears the whole connection down as soon as the peer closes its sending side (TLS
close_notify or a bare TCP FIN), and its transports cannot half-close their own side. The Docker CLI relies on
both for hijacked streams: `echo x | docker run -i busybox cat` sends stdin, closes its write side, and then
still reads the container's output. This subclass changes only that:

- when the application protocol's ``eof_received()`` returns True (the plain-TCP convention for "keep the
  connection open"), the connection stays open for writing after the peer's close_notify or FIN;
- ``write_eof()`` on the transport sends close_notify and keeps reading (TLS half-close).

Pinned to the SSLProtocol of CPython 3.11 (asyncio.sslproto); tests/engine exercises both directions.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any

# The private internals this subclass relies on are not in typeshed: type the bases as Any.
_ProtocolBase: Any = sslproto.SSLProtocol
_TransportBase: Any = sslproto._SSLProtocolTransport
_WRAPPED = sslproto.SSLProtocolState.WRAPPED
_CON_MADE = sslproto.AppProtocolState.STATE_CON_MADE


def _transport_write_eof(self: Any) -> None:
    proto = self._ssl_protocol
    if hasattr(proto, "write_eof_tls"):
        proto.write_eof_tls()
        return
    raise NotImplementedError


def _transport_can_write_eof(self: Any) -> bool:
    return hasattr(self._ssl_protocol, "write_eof_tls")


class HalfCloseSSLTransport(_TransportBase):
    """The app-side transport of HalfCloseSSLProtocol: write_eof() works."""

    write_eof = _transport_write_eof
    can_write_eof = _transport_can_write_eof




class _PeerCloseAsEOF:
    """After our close_notify, OpenSSL reports the peer's close_notify as SSLZeroReturnError instead of an
    empty read; SSLProtocol would take that for a fatal error. Make it the end of the stream it is."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    def read(self, *args: Any) -> Any:
        try:
            return self._obj.read(*args)
        except ssl.SSLZeroReturnError:
            return 0 if len(args) > 1 else b""


READ_BUFFER = 64 * 1024
"""What each served TLS connection allocates to read into (asyncio's default: 256 KiB)."""
CLIENT_READ_BUFFER = 32 * 1024
"""The same for client connections (to peers): two TLS records per read."""


def shrink_client_read_buffers() -> None:
    """Client TLS connections (aiohttp's, to peers) read into CLIENT_READ_BUFFER: a fan-out keeps one
    connection per node, so at asyncio's 256 KiB a 200-node cluster cost 50 MB of buffers alone (the entry
    agent's peak during such a fan-out: 165 MiB, now under 90)."""
    sslproto.SSLProtocol.max_size = CLIENT_READ_BUFFER


class HalfCloseSSLProtocol(_ProtocolBase):
    """SSLProtocol honouring eof_received() -> True and offering write_eof() (see module doc)."""

    _keep_open = False
    _wrote_eof = False
    max_size = READ_BUFFER  # the read buffer every connection allocates
    _app_transport: Any
    _app_transport_created: bool
    _app_state: Any
    _state: Any
    _sslobj: Any

    def _get_app_transport(self) -> HalfCloseSSLTransport:
        if self._app_transport is None:
            if self._app_transport_created:
                raise RuntimeError("Creating the app transport twice")
            self._app_transport = HalfCloseSSLTransport(self._loop, self)
            self._app_transport_created = True
        return self._app_transport

    def _call_eof_received(self) -> None:
        if self._app_state != _CON_MADE:
            return
        self._app_state = sslproto.AppProtocolState.STATE_EOF
        try:
            self._keep_open = bool(self._app_protocol.eof_received())
        except Exception as exc:
            self._fatal_error(exc, "Error calling eof_received()")

    def _start_shutdown(self) -> None:
        transport = self._app_transport
        if (
            self._keep_open
            and self._state == _WRAPPED
            and transport is not None
            and not transport._closed
        ):
            return  # the peer finished sending; we may still write until the application closes
        super()._start_shutdown()

    def eof_received(self) -> bool | None:
        if self._state == _WRAPPED:
            # A bare TCP FIN: deliver what is decrypted already, then tell the application.
            self._do_read()
            self._call_eof_received()
            if self._keep_open and self._app_transport is not None and not self._app_transport._closed:
                return True
        return super().eof_received()

    def write_eof_tls(self) -> None:
        """Send close_notify (our side is done) and keep reading the peer's data."""
        if self._wrote_eof or self._state != _WRAPPED:
            return
        self._wrote_eof = True
        self._sslobj = _PeerCloseAsEOF(self._sslobj)
        self._do_write()
        try:
            self._sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError:
            return
        self._process_outgoing()


def server_protocol_factory(
    loop: asyncio.AbstractEventLoop,
    app_factory: Any,
    context: ssl.SSLContext,
    handshake_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
) -> Any:
    """A protocol factory for loop.create_server() that terminates TLS with HalfCloseSSLProtocol."""

    def factory() -> HalfCloseSSLProtocol:
        return HalfCloseSSLProtocol(
            loop,
            app_factory(),
            context,
            None,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
            ssl_shutdown_timeout=shutdown_timeout,
        )

    return factory


async def open_tls_connection(
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = None,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like asyncio.open_connection(ssl=...) but the writer can write_eof() (TLS half-close)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    stream_proto = asyncio.StreamReaderProtocol(reader, loop=loop)
    waiter = loop.create_future()
    tls = HalfCloseSSLProtocol(
        loop, stream_proto, context, waiter, server_side=False,
        server_hostname=server_hostname if server_hostname is not None else host,
        ssl_handshake_timeout=30.0, ssl_shutdown_timeout=10.0,
    )
    await loop.create_connection(lambda: tls, host, port)
    await waiter
    transport = tls._app_transport
    writer = asyncio.StreamWriter(transport, stream_proto, reader, loop)
    return reader, writer
