"""Stable error codes, one log line per failure and Docker-style JSON error bodies."""

from __future__ import annotations

import logging
from enum import StrEnum

from aiohttp import web

log = logging.getLogger("keelson")


class Code(StrEnum):
    """Stable codes: grep-able in logs, documented in the README."""

    CONFIG_INVALID = "CONFIG_INVALID"
    AUTH_MISSING_SIGNATURE = "AUTH_MISSING_SIGNATURE"
    AUTH_INVALID_SIGNATURE = "AUTH_INVALID_SIGNATURE"
    AUTH_KEY_MISMATCH = "AUTH_KEY_MISMATCH"
    AUTH_SECRET_TIMEOUT = "AUTH_SECRET_TIMEOUT"
    PROXY_DOCKER_UNREACHABLE = "PROXY_DOCKER_UNREACHABLE"
    PROXY_DOCKER_STREAM_BROKEN = "PROXY_DOCKER_STREAM_BROKEN"
    PROXY_CLIENT_GONE = "PROXY_CLIENT_GONE"
    PROXY_PEER_UNREACHABLE = "PROXY_PEER_UNREACHABLE"
    PROXY_TARGET_UNKNOWN = "PROXY_TARGET_UNKNOWN"
    PROXY_NO_MANAGER = "PROXY_NO_MANAGER"
    FANOUT_NODE_FAILED = "FANOUT_NODE_FAILED"
    FANOUT_ALL_FAILED = "FANOUT_ALL_FAILED"
    BROWSE_BAD_REQUEST = "BROWSE_BAD_REQUEST"
    BROWSE_FORBIDDEN_PATH = "BROWSE_FORBIDDEN_PATH"
    BROWSE_NOT_FOUND = "BROWSE_NOT_FOUND"
    BROWSE_IO_ERROR = "BROWSE_IO_ERROR"
    WEBSOCKET_FAILED = "WEBSOCKET_FAILED"
    HOST_INFO_FAILED = "HOST_INFO_FAILED"
    BAD_REQUEST = "BAD_REQUEST"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    CLUSTER_SERF_FAILED = "CLUSTER_SERF_FAILED"
    CLUSTER_JOIN_FAILED = "CLUSTER_JOIN_FAILED"
    EDGE_KEY_INVALID = "EDGE_KEY_INVALID"
    EDGE_KEY_STORE_FAILED = "EDGE_KEY_STORE_FAILED"
    EDGE_KEY_HANDOVER_FAILED = "EDGE_KEY_HANDOVER_FAILED"
    EDGE_UI_FAILED = "EDGE_UI_FAILED"
    EDGE_POLL_FAILED = "EDGE_POLL_FAILED"
    EDGE_TUNNEL_FAILED = "EDGE_TUNNEL_FAILED"
    EDGE_JOB_FAILED = "EDGE_JOB_FAILED"


def log_failure(code: Code, message: str, **fields: object) -> None:
    """One line per failure: the code first, then the message and key=value context."""
    extra = " ".join(f"{k}={v!r}" for k, v in fields.items())
    log.warning("%s %s%s", code.value, message, f" {extra}" if extra else "")


def json_error(
    status: int,
    message: str,
    code: Code | None = None,
    details: str | None = None,
    headers: dict[str, str] | None = None,
    **fields: object,
) -> web.Response:
    """A Docker-style error response (``{"message": ...}``), logged once when a code is given."""
    if code is not None:
        log_failure(code, message, status=status, **fields)
    body: dict[str, str] = {"message": message}
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=status, headers=headers)
