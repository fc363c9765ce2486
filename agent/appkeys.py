"""Typed keys for what the aiohttp application shares between handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiodocker

DOCKER: web.AppKey[aiodocker.Docker] = web.AppKey("docker")
"""aiodocker client for the agent's own calls (volume inspect)."""
HOST_ROOT_KEY: web.AppKey[str] = web.AppKey("host_root", str)
"""Where the host's `/` is mounted (KEELSON_HOST_ROOT): host info and browsing without a volume read there."""
DEFAULT_HOST_ROOT = "/host"
