"""Keelson agent: a Docker API proxy compatible with the Portainer agent."""

VERSION = "2.23.0"
"""The Portainer agent version we are wire-compatible with (sent as ``Portainer-Agent``)."""
API_VERSION = "2"
PLATFORM_DOCKER = "1"
