"""POST /v2/dockerhub: the Docker Hub pull rate limit seen from this node, as the Go agent computes it.

An anonymous (or basic-auth) pull token for `ratelimitpreview/test` from auth.docker.io, then a HEAD on that
image's manifest at registry-1.docker.io: the `RateLimit-Limit` and `RateLimit-Remaining` headers
(`100;w=21600`: the number before `;`) give `{"remaining", "limit"}`. Missing headers (paid accounts) give
`null`, not an error. Both base URLs are app keys so tests can use a loopback stand-in.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from aiohttp import web

from agent.bodylimit import BodyTooLarge, read_bounded, too_large
from agent.errors import Code, json_error

DOCKERHUB_AUTH_URL: web.AppKey[str] = web.AppKey("dockerhub_auth_url", str)
"""Base URL of the token service (default https://auth.docker.io)."""
DOCKERHUB_REGISTRY_URL: web.AppKey[str] = web.AppKey("dockerhub_registry_url", str)
"""Base URL of the registry (default https://registry-1.docker.io)."""

DEFAULT_AUTH_URL = "https://auth.docker.io"
DEFAULT_REGISTRY_URL = "https://registry-1.docker.io"
TOKEN_PATH = "/token?service=registry.docker.io&scope=repository:ratelimitpreview/test:pull"
LIMITS_PATH = "/v2/ratelimitpreview/test/manifests/latest"
TIMEOUT = aiohttp.ClientTimeout(total=3)
"""Go's http.Client{Timeout: 3s}, per request."""


class _PayloadError(ValueError):
    pass


class _UpstreamError(Exception):
    pass


def parse_payload(payload: Any) -> tuple[bool, str, str]:
    """Go's decoding: keys match case-insensitively, null is the zero value, other types are refused."""
    if not isinstance(payload, dict):
        raise _PayloadError("expected a JSON object")
    fields = {str(k).lower(): v for k, v in payload.items()}
    auth = fields.get("authentication")
    username = fields.get("username")
    password = fields.get("password")
    if auth is not None and not isinstance(auth, bool):
        raise _PayloadError("authentication must be a boolean")
    for name, value in (("username", username), ("password", password)):
        if value is not None and not isinstance(value, str):
            raise _PayloadError(f"{name} must be a string")
    if auth and (not username or not password):
        raise _PayloadError("Missing username or password")
    return bool(auth), username or "", password or ""


async def dockerhub_status(request: web.Request) -> web.Response:
    """`{"remaining": int, "limit": int}`, or `null` when Docker Hub sends no rate-limit headers."""
    try:
        auth, username, password = parse_payload(json.loads(await read_bounded(request)))
    except BodyTooLarge as exc:
        return too_large(exc, path=request.path)
    except (ValueError, UnicodeDecodeError) as exc:
        return json_error(400, "Invalid request payload", Code.BAD_REQUEST, details=str(exc))
    auth_url = request.app.get(DOCKERHUB_AUTH_URL, DEFAULT_AUTH_URL).rstrip("/")
    registry_url = request.app.get(DOCKERHUB_REGISTRY_URL, DEFAULT_REGISTRY_URL).rstrip("/")
    # trust_env: honour HTTPS_PROXY/NO_PROXY like Go's default transport.
    async with aiohttp.ClientSession(timeout=TIMEOUT, trust_env=True) as session:
        try:
            token = await _token(session, auth_url, _basic_auth(username, password) if auth else None)
        except (_UpstreamError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return json_error(500, "Unable to retrieve DockerHub token from DockerHub", Code.INTERNAL,
                              details=str(exc) or type(exc).__name__)
        try:
            limits = await _limits(session, registry_url, token)
        except (_UpstreamError, aiohttp.ClientError, TimeoutError) as exc:
            return json_error(500, "Unable to retrieve DockerHub rate limits from DockerHub", Code.INTERNAL,
                              details=str(exc) or type(exc).__name__)
    return web.json_response(limits)


def _basic_auth(username: str, password: str) -> str:
    """Go's SetBasicAuth: base64 of the UTF-8 `user:password`."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


async def _token(session: aiohttp.ClientSession, base: str, authorization: str | None) -> str:
    headers = {"Authorization": authorization} if authorization else {}
    async with session.get(base + TOKEN_PATH, headers=headers) as resp:
        if resp.status != 200:
            raise _UpstreamError(f"failed fetching dockerhub token (HTTP {resp.status})")
        data = await resp.json(content_type=None)
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) else ""


async def _limits(session: aiohttp.ClientSession, base: str, token: str) -> dict[str, int] | None:
    async with session.head(base + LIMITS_PATH, headers={"Authorization": f"Bearer {token}"}) as resp:
        if resp.status != 200:
            raise _UpstreamError(f"failed fetching dockerhub limits (HTTP {resp.status})")
        limit = _numeric_header(resp.headers.get("RateLimit-Limit"))
        remaining = _numeric_header(resp.headers.get("RateLimit-Remaining"))
    if limit is None or remaining is None:
        return None
    return {"remaining": remaining, "limit": limit}


def _numeric_header(value: str | None) -> int | None:
    """`100;w=21600` -> 100 (Go: strconv.Atoi of the part before the first `;`)."""
    if not value:
        return None
    head = value.split(";", 1)[0]
    try:
        return int(head) if head.lstrip("+-").isdigit() else None
    except ValueError:
        return None
