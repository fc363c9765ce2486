"""The private internals of asyncio, aiohttp and aiodocker the agent relies on, looked up when it starts.

An upgrade that removes or renames one of them stops the start with one line naming it, instead of
breaking a TLS half-close, a hijacked stream or the engine hop under load later. tests/unit/test_internals.py
checks the same internals in depth (what they do, not only that they exist). Versions other than the ones
the agent was verified with start, with a warning: the internals are what decides, not the version number.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from asyncio import sslproto
from importlib.metadata import PackageNotFoundError, version

VERIFIED = {"python": "3.11", "aiohttp": "3.14", "aiodocker": "0.27"}
"""The minor versions the agent and tests/unit/test_internals.py were verified with."""

_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    # module, object path, what relies on it
    ("asyncio.sslproto", "SSLProtocol._get_app_transport", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol._call_eof_received", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol._start_shutdown", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol._do_read", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol._do_write", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol._process_outgoing", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocol.max_size", "TLS read buffers (agent/tlsproto.py)"),
    ("asyncio.sslproto", "_SSLProtocolTransport", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "SSLProtocolState.WRAPPED", "TLS half-close (agent/tlsproto.py)"),
    ("asyncio.sslproto", "AppProtocolState.STATE_CON_MADE", "TLS half-close (agent/tlsproto.py)"),
    ("aiohttp.http_parser", "HttpRequestParser.feed_data", "the lean front (agent/front.py)"),
    ("aiohttp.http_parser", "HttpResponseParser.feed_data", "the engine hop (proxy/h1.py)"),
    ("aiohttp.base_protocol", "BaseProtocol._drain_helper", "the engine hop (proxy/h1.py)"),
    ("aiohttp.web_response", "StreamResponse._send_headers_immediately", "relayed answers (proxy/forward.py)"),
    ("aiodocker", "Docker._query_json", "the engine's own calls (agent/engine.py)"),
)


def missing() -> list[str]:
    """Each internal that is not where the agent expects it, as `name, used by what relies on it,`."""
    gone = []
    for module_name, path, user in _ATTRIBUTES:
        try:
            obj: object = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            gone.append(f"{module_name}.{path}, used by {user},")
    from aiohttp import web_protocol

    if "_message_tail" not in getattr(web_protocol.RequestHandler, "__slots__", ()):
        gone.append("aiohttp.web_protocol.RequestHandler._message_tail, used by hijacked streams (proxy/forward.py),")
    if not issubclass(sslproto.SSLProtocol, asyncio.BufferedProtocol):
        gone.append("asyncio.sslproto.SSLProtocol as a BufferedProtocol, used by the connection guard "
                    "(agent/connguard.py),")
    return gone


def running_versions() -> dict[str, str]:
    """The versions that run, by the names of VERIFIED."""
    found = {"python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"}
    for name in ("aiohttp", "aiodocker"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "?"
    return found


def unverified(versions: dict[str, str]) -> list[str]:
    """Each of `versions` (running_versions()) whose minor version is not the verified one, as
    `name running (verified: x.y)`."""
    out = []
    for name, running in versions.items():
        if running != VERIFIED[name] and not running.startswith(VERIFIED[name] + "."):
            out.append(f"{name} {running} (verified: {VERIFIED[name]})")
    return out
