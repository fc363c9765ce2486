"""Every private internal of a library that Keelson relies on, checked: when an upgrade changes one, this
fails here, by name, instead of somewhere deep in a stream.

- aiohttp's RequestHandler._message_tail: bytes a client sent after a hijack request's head (proxy/forward.py)
- asyncio's sslproto internals: the TLS half-close subclass (agent/tlsproto.py) and the connection guard,
  which finds the TCP transport below TLS (agent/connguard.py)
- asyncio's SSLProtocol.max_size, read when a connection is made: peers' client connections read into
  smaller buffers (agent/tlsproto.py shrink_client_read_buffers, applied by proxy/upstream.py PeerPool)
- aiodocker's Docker._query_json: raw JSON calls (agent/engine.py)
- aiohttp's HttpResponseParser and BaseProtocol, below its client: the engine hop's lean client (proxy/h1.py)
  feeds the parser and lets the payload reader pause and resume its protocol
- aiohttp's StreamResponse._send_headers_immediately: a relayed answer whose body is at hand sends its head
  with the body's first piece (proxy/forward.py _CoalescedResponse)
- aiohttp's HttpRequestParser, fed one request head at a time by the lean front (agent/front.py), which
  tells a request without body by its payload being EMPTY_PAYLOAD; and a RequestHandler taking over a
  connection that is already open (connection_made, then data_received with the bytes not yet answered)

The agent looks the same internals up when it starts (agent/internals.py): the last tests here check that.
"""

from __future__ import annotations

import asyncio
import inspect
from asyncio import sslproto
from typing import Any

import aiodocker
import aiohttp
import pytest
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


def test_aiohttp_response_parser_and_base_protocol() -> None:
    from aiohttp import http_parser
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

    params = inspect.signature(http_parser.HttpResponseParserPy.__init__).parameters
    for name in ("protocol", "loop", "limit", "payload_exception", "response_with_body", "read_until_eof",
                 "auto_decompress"):
        assert name in params, (name, aiohttp.__version__)
    assert http_parser.HttpResponseParser.__module__ == "aiohttp._http_parser", "the C parser is not built"
    for name in ("feed_data", "feed_eof", "pause_reading"):
        assert hasattr(http_parser.HttpResponseParser, name), name
    for name in ("_drain_helper", "_parser", "pause_reading", "resume_reading", "transport"):
        assert hasattr(BaseProtocol, name) or name in BaseProtocol.__slots__, name
    # resuming a paused reader re-enters data_received with no bytes: the parser goes on with what it holds
    assert 'self.data_received(b"")' in inspect.getsource(BaseProtocol.resume_reading)
    assert EMPTY_PAYLOAD.at_eof() and hasattr(StreamReader, "at_eof")


async def test_aiohttp_response_parser_feeds_one_answer() -> None:
    from aiohttp.http_parser import HttpResponseParser

    from proxy.h1 import _Connection

    conn = _Connection(asyncio.get_running_loop())
    parser = HttpResponseParser(conn, asyncio.get_running_loop(), 2**16, payload_exception=aiohttp.ClientPayloadError,
                                response_with_body=True, read_until_eof=True, auto_decompress=False)
    messages, upgraded, tail = parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nApi-Version: 1.47\r\n\r\nOK")
    assert not upgraded and not tail and len(messages) == 1
    message, payload = messages[0]
    assert (message.code, message.reason, message.headers["api-version"]) == (200, "OK", "1.47")
    assert not message.should_close
    assert payload.at_eof() is False and await payload.read() == b"OK" and payload.at_eof()


def test_aiohttp_stream_response_can_hold_its_head_for_the_body() -> None:
    from aiohttp import web, web_response

    from proxy.forward import _CoalescedResponse

    assert web.StreamResponse._send_headers_immediately is True
    assert web.Response._send_headers_immediately is False
    assert "if self._send_headers_immediately:" in inspect.getsource(web_response.StreamResponse._write_headers)
    assert _CoalescedResponse._send_headers_immediately is False


async def test_aiohttp_request_parser_fed_one_head_at_a_time() -> None:
    from aiohttp.http_parser import HttpRequestParser
    from aiohttp.streams import EMPTY_PAYLOAD

    from agent.server import MAX_LINE

    class Holder:
        pass

    def new_parser() -> HttpRequestParser:
        return HttpRequestParser(Holder(), asyncio.get_running_loop(), 2**16, max_line_size=MAX_LINE,
                                 max_field_size=MAX_LINE, auto_decompress=False)

    parser = new_parser()
    messages, upgraded, tail = parser.feed_data(b"GET /v1.41/_ping?x=1 HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\r\n")
    assert len(messages) == 1 and not upgraded and not tail
    message, payload = messages[0]
    assert (message.method, message.path, message.version) == ("GET", "/v1.41/_ping?x=1", aiohttp.HttpVersion11)
    assert message.headers["x-a"] == "b" and not message.should_close and payload is EMPTY_PAYLOAD
    # the next head on the same parser (keep-alive); a head that announces a body; one that closes
    messages, _, _ = parser.feed_data(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert messages[0][0].path == "/a" and messages[0][1] is EMPTY_PAYLOAD
    messages, _, _ = new_parser().feed_data(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert messages[0][0].should_close and messages[0][1] is EMPTY_PAYLOAD
    messages, _, _ = parser.feed_data(b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    assert messages[0][1] is not EMPTY_PAYLOAD


def test_aiohttp_request_handler_takes_over_an_open_connection() -> None:
    for name in ("connection_made", "data_received", "eof_received", "pause_writing"):
        assert callable(getattr(web_protocol.RequestHandler, name)), name
    # the server's factory call makes a handler for one connection (agent/front.py LeanFront.fallback)
    assert "RequestHandler(" in inspect.getsource(aiohttp.web_server.Server.__call__)


def test_the_start_check_finds_every_internal_here() -> None:
    from agent import internals

    assert internals.missing() == []


def test_the_start_check_names_what_is_gone_and_what_relies_on_it(monkeypatch: Any) -> None:
    from agent import internals

    monkeypatch.delattr(aiodocker.Docker, "_query_json")
    monkeypatch.setattr(web_protocol.RequestHandler, "__slots__", ())
    assert internals.missing() == [
        "aiodocker.Docker._query_json, used by the engine's own calls (agent/engine.py),",
        "aiohttp.web_protocol.RequestHandler._message_tail, used by hijacked streams (proxy/forward.py),",
    ]


def test_other_versions_are_named_but_only_their_minor_version_counts(monkeypatch: Any) -> None:
    from agent import internals

    monkeypatch.setattr(internals, "VERIFIED", {"python": "3.11", "aiohttp": "3.14", "aiodocker": "0.27"})
    running = {"python": "3.11.9", "aiohttp": "3.15.0", "aiodocker": "0.27.1"}
    assert internals.unverified(running) == ["aiohttp 3.15.0 (verified: 3.14)"]
    assert set(internals.running_versions()) == set(internals.VERIFIED)  # the names the check compares


def test_an_agent_without_an_internal_stops_at_start_with_one_line(monkeypatch: Any, capfd: Any) -> None:
    from agent import __main__ as entry
    from agent import internals

    monkeypatch.setattr(internals, "missing", lambda: ["asyncio.sslproto.X, used by TLS (agent/tlsproto.py),"])
    monkeypatch.setattr(entry, "serve", lambda *args: pytest.fail("the agent must not start"))
    monkeypatch.setattr(entry, "Supervisor", lambda *args: pytest.fail("the agent must not start"))
    assert entry.main([]) == 1
    lines = [line for line in capfd.readouterr().err.splitlines() if "INTERNALS_CHANGED" in line]
    expected = "INTERNALS_CHANGED asyncio.sslproto.X, used by TLS (agent/tlsproto.py), is gone (running python 3"
    assert len(lines) == 1 and expected in lines[0], lines
