"""Request bodies the agent reads itself (JSON of browse rename, Docker Hub, a fan-out's body) are bounded.

Everything the agent only relays is streamed and never held; what it must parse is read up to
JSON_BODY_LIMIT, and a larger body is refused with 413 before it is read whole.
"""

from __future__ import annotations

from aiohttp import web

from agent.errors import Code, json_error

JSON_BODY_LIMIT = 2**20
"""1 MiB: far above any body Portainer sends to these endpoints (a few hundred bytes)."""


class BodyTooLarge(Exception):
    """The body passed the limit (raised before it was read whole)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


async def read_bounded(request: web.Request, limit: int = JSON_BODY_LIMIT) -> bytes:
    """The whole body, if it is at most `limit` bytes; BodyTooLarge otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise BodyTooLarge(limit)
    return bytes(data)


def too_large(exc: BodyTooLarge, path: str = "") -> web.Response:
    """413 in Docker's shape; the connection closes (the rest of the body is never read)."""
    response = json_error(413, str(exc), Code.LIMIT_BODY_TOO_LARGE, path=path)
    response.force_close()
    return response
