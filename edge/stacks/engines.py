"""How an Edge stack is deployed: Docker Compose v2 on a standalone engine, ``docker stack`` on a Swarm.

Command lines as the Go agent's (portainer/agent exec/docker_compose_stack.go, exec/docker_swarm_stack.go and
the portainer module's pkg/libstack/compose), so a device moved from the Go agent keeps its projects:
  validate  docker-compose -f <folder>/<entry> config --quiet                      (both engines)
  deploy    docker-compose -f <folder>/<entry> --project-name edge_<name> up -d  (in the folder)
            docker stack deploy --with-registry-auth --compose-file <folder>/<entry> edge_<name>
  remove    docker-compose --project-name edge_<name> down --remove-orphans
            docker stack rm edge_<name>
The commands get the agent's environment, DOCKER_HOST of the engine the agent serves, and the stack's env vars
(``PORTAINER_EDGE_ID`` among them). A failed command's error is its standard error (the last 16 KiB; output is
read as it comes, never held whole). Whether a project runs is read from the engine's API (containers by the
``com.docker.compose.project`` label, services by ``com.docker.stack.namespace``), which is what
``compose ps`` and ``docker stack services`` read too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiodocker

STDERR_KEEP = 16 * 1024
COMMAND_TIMEOUT = 30 * 60.0
"""A deploy may pull images over a slow link; a command still running after this is killed."""
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
STACK_NAMESPACE_LABEL = "com.docker.stack.namespace"
_EXITED = re.compile(r"^Exited \((-?\d+)\)")


class CommandError(Exception):
    """A command that failed; the message is what it wrote to standard error (or why it did not run)."""


async def run_command(argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str],
                      timeout: float = COMMAND_TIMEOUT) -> None:
    """Run to completion; CommandError with the tail of its stderr when it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stderr is not None
    tail = bytearray()

    async def drain() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-STDERR_KEEP]
        await proc.wait()

    try:
        async with asyncio.timeout(timeout):
            await drain()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CommandError(f"{Path(argv[0]).name} {argv[-1]} did not finish within {timeout:g}s") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        text = tail.decode("utf-8", "replace").strip()
        raise CommandError(text or f"{Path(argv[0]).name} exited with code {proc.returncode}")


@dataclass(frozen=True)
class ProjectStatus:
    state: str
    """``running``, ``completed`` (every container exited 0), ``error``, ``pending`` or ``gone`` (nothing)."""
    error: str = ""


def compose_status(containers: Sequence[Mapping[str, Any]]) -> ProjectStatus:
    """From ``GET /containers/json?all=1`` entries of one project (pure)."""
    if not containers:
        return ProjectStatus("gone")
    exited_ok = 0
    running = 0
    for item in containers:
        state = item.get("State", "")
        service = (item.get("Labels") or {}).get(COMPOSE_SERVICE_LABEL, "?")
        if state == "running":
            running += 1
        elif state == "exited":
            match = _EXITED.match(item.get("Status", ""))
            code = int(match.group(1)) if match else -1
            if code != 0:
                return ProjectStatus("error", f"service {service} exited with code {code}")
            exited_ok += 1
        elif state == "dead":
            return ProjectStatus("error", f"service {service} is dead")
    if running + exited_ok < len(containers):
        return ProjectStatus("pending")
    return ProjectStatus("running" if running else "completed")


def swarm_status(services: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]]) -> ProjectStatus:
    """From ``GET /services`` and ``GET /tasks`` of one stack (pure): running once every service has its
    replicas (or, global, one per node it placed a task on) running."""
    if not services:
        return ProjectStatus("gone")
    last_error = ""
    for service in services:
        mine = [t for t in tasks if t.get("ServiceID") == service.get("ID")]
        running = sum(1 for t in mine if (t.get("Status") or {}).get("State") == "running")
        mode = (service.get("Spec") or {}).get("Mode") or {}
        if "Global" in mode:
            wanted = max(1, sum(1 for t in mine if t.get("DesiredState") == "running"))
        else:
            wanted = int(((mode.get("Replicated") or {}).get("Replicas")) or 0)
        for task in mine:
            status = task.get("Status") or {}
            if status.get("State") in ("failed", "rejected") and status.get("Err"):
                last_error = f"service {(service.get('Spec') or {}).get('Name', '?')}: {status['Err']}"
        if running < wanted:
            return ProjectStatus("pending", last_error)
    return ProjectStatus("running")


async def validate_with_compose(compose: str, folder: Path, entry: Path, env: Mapping[str, str]) -> None:
    """`config --quiet`: both engines validate a stack with Compose first (as Go does)."""
    await run_command([compose, "-f", str(folder / entry), "config", "--quiet"], cwd=folder, env=env,
                      timeout=120.0)


class StackEngine(Protocol):
    kind: str

    async def validate(self, folder: Path, entry: Path, env: Mapping[str, str]) -> None: ...

    async def deploy(self, folder: Path, entry: Path, project: str, env: Mapping[str, str]) -> None: ...

    async def remove(self, project: str, env: Mapping[str, str]) -> None: ...

    async def status(self, project: str) -> ProjectStatus: ...


@dataclass
class ComposeEngine:
    docker: aiodocker.Docker
    compose: str = "docker-compose"
    kind: str = "compose"

    async def validate(self, folder: Path, entry: Path, env: Mapping[str, str]) -> None:
        await validate_with_compose(self.compose, folder, entry, env)

    async def deploy(self, folder: Path, entry: Path, project: str, env: Mapping[str, str]) -> None:
        await run_command([self.compose, "-f", str(folder / entry), "--project-name", project, "up", "-d"],
                          cwd=folder, env=env)

    async def remove(self, project: str, env: Mapping[str, str]) -> None:
        await run_command([self.compose, "--project-name", project, "down", "--remove-orphans"], cwd=None, env=env,
                          timeout=600.0)

    async def status(self, project: str) -> ProjectStatus:
        filters = json.dumps({"label": [f"{COMPOSE_PROJECT_LABEL}={project}"]})
        containers = await self.docker._query_json("containers/json", params={"all": "1", "filters": filters})
        return compose_status(containers)


@dataclass
class SwarmEngine:
    docker: aiodocker.Docker
    compose: str = "docker-compose"
    cli: str = "docker"
    kind: str = "swarm"

    async def validate(self, folder: Path, entry: Path, env: Mapping[str, str]) -> None:
        await validate_with_compose(self.compose, folder, entry, env)

    async def deploy(self, folder: Path, entry: Path, project: str, env: Mapping[str, str]) -> None:
        await run_command([self.cli, "stack", "deploy", "--with-registry-auth", "--compose-file",
                           str(folder / entry), project], cwd=folder, env=env)

    async def remove(self, project: str, env: Mapping[str, str]) -> None:
        await run_command([self.cli, "stack", "rm", project], cwd=None, env=env, timeout=600.0)

    async def status(self, project: str) -> ProjectStatus:
        services = await self.docker.services.list(filters={"label": [f"{STACK_NAMESPACE_LABEL}={project}"]})
        tasks = await self.docker.tasks.list(filters={"service": [s["ID"] for s in services]}) if services else []
        return swarm_status(services, tasks)


def command_env(docker_host: str, extra: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The agent's environment, the engine it serves, the stack's variables (Go: os.Environ + stack env)."""
    env = dict(os.environ)
    env["DOCKER_HOST"] = docker_host
    env.update(extra)
    return env
