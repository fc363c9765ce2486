"""The clean-up an agent does when an Edge update started it (UPDATE_ID set), as Go's internals/updates.

Portainer's updater (a ``portainer-updater`` container labelled ``io.portainer.updater=true``) starts the new
agent beside the old one, labelled ``io.portainer.update.scheduleId=<UPDATE_ID>`` and named ``<old>-update``.
The new agent then (portainer/agent internals/updates/docker.go):
1. removes the old agent container (force) and takes its name: agent containers are those labelled
   ``io.portainer.agent=true`` or whose image starts with ``portainer/agent`` or ``portainerci/agent``
   (here also ``keelson/agent``); the one with our schedule label is the new one;
2. removes the exited updater containers and their networks, three tries ten seconds apart while an updater
   still runs (internals/updates/update.go).
Differences: Go also takes any container whose log mentions "Starting Agent API server" as an agent (reading
every container's log); Keelson does not, and never removes its own container.
Remote updates are a Business Edition feature; CE servers never start one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiodocker
import aiohttp

from agent.errors import Code, log_failure

log = logging.getLogger(__name__)

AGENT_LABEL = "io.portainer.agent"
SCHEDULE_LABEL = "io.portainer.update.scheduleId"
UPDATER_LABEL = "io.portainer.updater"
AGENT_IMAGES = ("portainer/agent", "portainerci/agent", "keelson/agent")
ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError)


def split_agents(containers: Sequence[Mapping[str, Any]], update_id: int, own_id: str = ""
                 ) -> tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]:
    """(old agent containers to remove, the new one) among ``GET /containers/json?all=1`` entries (pure)."""
    old: list[Mapping[str, Any]] = []
    new: Mapping[str, Any] | None = None
    for item in containers:
        labels = item.get("Labels") or {}
        is_agent = labels.get(AGENT_LABEL) == "true" or str(item.get("Image", "")).startswith(AGENT_IMAGES)
        if not is_agent:
            continue
        if labels.get(SCHEDULE_LABEL) == str(update_id):
            new = item
        elif item.get("Id") != own_id:
            old.append(item)
    return old, new


def _name(item: Mapping[str, Any]) -> str:
    names = item.get("Names") or [""]
    return str(names[0]).lstrip("/")


async def replace_old_agent(docker: aiodocker.Docker, update_id: int, own_id: str = "") -> None:
    containers = await docker._query_json("containers/json", params={"all": "1"})
    old, new = split_agents(containers, update_id, own_id)
    old_name = ""
    for item in old:
        old_name = _name(item)
        try:
            await docker.containers.container(item["Id"]).delete(force=True)
            log.info("Edge update %d: old agent container %s removed", update_id, old_name)
        except aiodocker.DockerError as exc:
            log_failure(Code.EDGE_UPDATE_FAILED, f"Edge update {update_id}: cannot remove the old agent container "
                        f"{old_name}: {exc.message}")
    if new is not None and old_name and any(str(n).endswith("-update") for n in new.get("Names") or []):
        try:
            await docker.containers.container(new["Id"]).rename(old_name)
            log.info("Edge update %d: agent container renamed %s -> %s", update_id, _name(new), old_name)
        except aiodocker.DockerError as exc:
            log_failure(Code.EDGE_UPDATE_FAILED, f"Edge update {update_id}: cannot rename {_name(new)} to "
                        f"{old_name}: {exc.message}")


async def remove_updaters(docker: aiodocker.Docker) -> bool:
    """Remove exited updater containers and their networks; False while one still runs."""
    filters = json.dumps({"label": [f"{UPDATER_LABEL}=true"]})
    running = False
    for item in await docker._query_json("containers/json", params={"all": "1", "filters": filters}):
        if item.get("State") == "running":
            running = True
            continue
        if item.get("State") != "exited":
            continue
        await docker.containers.container(item["Id"]).delete(force=True)
        for network in ((item.get("NetworkSettings") or {}).get("Networks") or {}).values():
            network_id = network.get("NetworkID")
            if network_id:
                try:
                    await (await docker.networks.get(network_id)).delete()
                except aiodocker.DockerError as exc:  # a predefined network (bridge) cannot go: fine
                    log.debug("network %s of updater %s kept: %s", network_id, _name(item), exc.message)
        log.info("Edge update: updater container %s removed", _name(item))
    return not running


async def clean_after_update(docker: aiodocker.Docker, update_id: int, own_id: str = "", tries: int = 3,
                             pause: float = 10.0) -> None:
    try:
        await replace_old_agent(docker, update_id, own_id)
    except ERRORS as exc:
        log_failure(Code.EDGE_UPDATE_FAILED, f"Edge update {update_id}: agent containers not checked: {exc}")
    for attempt in range(1, tries + 1):
        try:
            if await remove_updaters(docker):
                return
            problem = "an updater container is still running"
        except ERRORS as exc:
            problem = str(exc) or type(exc).__name__
        if attempt == tries:
            log_failure(Code.EDGE_UPDATE_FAILED, f"Edge update {update_id}: updater not cleaned up: {problem}")
            return
        await asyncio.sleep(pause)
