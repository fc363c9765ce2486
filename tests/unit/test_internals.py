"""Every private internal of a library that Keelson relies on, checked: when an upgrade changes one, this
fails here, by name, instead of somewhere deep in a stream.

- aiohttp's RequestHandler._message_tail: bytes a client sent after a hijack request's head (proxy/forward.py)
- asyncio's sslproto internals: the TLS half-close subclass (agent/tlsproto.py) and the connection guard,
  which finds the TCP transport below TLS (agent/connguard.py)
- asyncio's SSLProtocol.max_size, read when a connection is made: peers' client connections read into
  smaller buffers (agent/tlsproto.py shrink_client_read_buffers, applied by proxy/upstream.py PeerPool)
- aiodocker's Docker._query_json: raw JSON calls (agent/engine.py)
"""

from __future__ import annotations

import asyncio
import inspect
from asyncio import sslproto

import aiodocker
import aiohttp
from aiohttp import web_protocol

from agent import tlsproto


def test_aiohttp_keeps_the_bytes_after_a_head_in_message_tail() -> None:
    assert "_message_tail" in web_protocol.RequestHandler.__slots__, aiohttp.__version__
    source = inspect.getsource(web_protocol.RequestHandler.data_received)
    assert "_message_tail" in source


def test_asyncio_sslproto_has_what_the_half_close_subclass_overrides() -> None:
    for name in ("_get_app_transport", "_call_eof_received", "_start_shutdown", "eof_received", "_do_read",
                 "_do_write", "_process_outgoing", "_fatal_error", "max_size"):
        assert hasattr(sslproto.SSLProtocol, name), name
    assert hasattr(sslproto, "_SSLProtocolTransport")
    assert sslproto.SSLProtocolState.WRAPPED and sslproto.AppProtocolState.STATE_CON_MADE
    assert issubclass(tlsproto.HalfCloseSSLProtocol, asyncio.BufferedProtocol)
    transport_init = inspect.signature(sslproto._SSLProtocolTransport.__init__)
    assert list(transport_init.parameters)[:3] == ["self", "loop", "ssl_protocol"]
    # the connection guard reaches the TCP transport as <app transport>._ssl_protocol._transport
    assert "self._ssl_protocol = ssl_protocol" in inspect.getsource(sslproto._SSLProtocolTransport.__init__)
    assert "self._transport = transport" in inspect.getsource(sslproto.SSLProtocol.connection_made)


def test_aiodocker_query_json() -> None:
    assert inspect.iscoroutinefunction(aiodocker.Docker._query_json)
    assert list(inspect.signature(aiodocker.Docker._query_json).parameters)[:2] == ["self", "path"]


async def test_peer_connections_read_into_small_buffers() -> None:
    from proxy.upstream import PeerPool

    assert "bytearray(self.max_size)" in inspect.getsource(sslproto.SSLProtocol.__init__)
    pool = PeerPool()
    try:
        assert sslproto.SSLProtocol.max_size == tlsproto.CLIENT_READ_BUFFER
        assert tlsproto.HalfCloseSSLProtocol.max_size == tlsproto.READ_BUFFER
    finally:
        await pool.close()
