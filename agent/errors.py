"""Stable error codes, one log line per failure and Docker-style JSON error bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from enum import StrEnum

from aiohttp import web

log = logging.getLogger(__name__)


class Code(StrEnum):
    """Stable codes: grep-able in logs, documented in the README."""

    CONFIG_INVALID = "CONFIG_INVALID"
    INTERNALS_CHANGED = "INTERNALS_CHANGED"
    INTERNALS_UNVERIFIED = "INTERNALS_UNVERIFIED"
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
    EDGE_STACK_FAILED = "EDGE_STACK_FAILED"
    EDGE_STACK_REPORT_FAILED = "EDGE_STACK_REPORT_FAILED"
    EDGE_UPDATE_FAILED = "EDGE_UPDATE_FAILED"
    LIMIT_HEAD_TIMEOUT = "LIMIT_HEAD_TIMEOUT"
    LIMIT_HEAD_TOO_LARGE = "LIMIT_HEAD_TOO_LARGE"
    LIMIT_HEAD_BUDGET = "LIMIT_HEAD_BUDGET"
    LIMIT_UNPROVEN_CAP = "LIMIT_UNPROVEN_CAP"
    LIMIT_BODY_TOO_LARGE = "LIMIT_BODY_TOO_LARGE"
    START_FAILED = "START_FAILED"
    TASK_FAILED = "TASK_FAILED"


SUMMARY_INTERVAL = 10.0
"""A refusal code logs its first line in full, then one summary line per this many seconds."""


class _Summary:
    """Repeated failures of one code within SUMMARY_INTERVAL become one line with a count: a client that
    sends 20,000 bad requests costs two log lines, not 20,000."""

    def __init__(self) -> None:
        self.window_start: dict[str, float] = {}
        self.repeats: dict[str, int] = {}
        self.last: dict[str, str] = {}

    def note(self, code: str, line: str) -> bool:
        """True when the line should be logged now (first of its window)."""
        now = time.monotonic()
        start = self.window_start.get(code)
        if start is None or now - start >= SUMMARY_INTERVAL:
            self.flush(code)
            self.window_start[code] = now
            return True
        self.repeats[code] = self.repeats.get(code, 0) + 1
        self.last[code] = line
        if self.repeats[code] == 1:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by the next failure instead
                asyncio.get_running_loop().call_later(SUMMARY_INTERVAL - (now - start), self.flush, code)
        return False

    def flush(self, code: str) -> None:
        count = self.repeats.pop(code, 0)
        if count:
            log.warning("%s repeated %d more times in %gs (last: %s)", code, count, SUMMARY_INTERVAL,
                        self.last.pop(code, ""))
            self.window_start[code] = time.monotonic()


_summary = _Summary()
REFUSALS = frozenset({
    Code.AUTH_MISSING_SIGNATURE, Code.AUTH_INVALID_SIGNATURE, Code.AUTH_KEY_MISMATCH, Code.BAD_REQUEST,
    Code.NOT_FOUND, Code.METHOD_NOT_ALLOWED, Code.NOT_IMPLEMENTED, Code.LIMIT_HEAD_TIMEOUT,
    Code.LIMIT_HEAD_TOO_LARGE, Code.LIMIT_HEAD_BUDGET, Code.LIMIT_UNPROVEN_CAP, Code.LIMIT_BODY_TOO_LARGE,
    Code.BROWSE_BAD_REQUEST, Code.BROWSE_FORBIDDEN_PATH, Code.BROWSE_NOT_FOUND,
})
"""Answers to what a client sent (anyone can send a lot of them): summarised, not one line each."""


def log_failure(code: Code, message: str, _depth: int = 1, **fields: object) -> None:
    """One line per failure (the code first, then the message and key=value context), under the logger of
    the module that failed (so one module's logs can be turned up); refusals of a client's request are
    summarised when the same code repeats within SUMMARY_INTERVAL."""
    extra = " ".join(f"{k}={v!r}" for k, v in fields.items())
    line = f"{message}{f' {extra}' if extra else ''}"
    if code not in REFUSALS or _summary.note(code.value, line):
        # the caller's module, as logging itself finds callers (a frame walk, no traceback)
        caller = sys._getframe(_depth).f_globals.get("__name__", __name__)
        logging.getLogger(caller).warning("%s %s", code.value, line)


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
        log_failure(code, message, _depth=2, status=status, **fields)
    body: dict[str, str] = {"message": message}
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=status, headers=headers)
