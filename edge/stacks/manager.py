"""Edge stacks: deploy what the poll lists, redeploy a new version, remove what it drops, report each step.

Inside the poll (as Go's edge/poll.go processStacks): a new stack or a new version is fetched, its files
written to DATA_PATH/edge_stacks/<id> and Acknowledged (3) at once; a fetch that fails aborts the rest of
that poll's stacks (tried again next poll). One worker then takes the stacks in turn (removals first, then
deployments by id), as Go's single stack loop (edge/stack/stack.go):
  deploy   validate (Error 2 "failed to validate stack: ..."), Deploying (8), deploy (Error 2
           "failed to redeploy stack: ..."), DeploymentReceived (1), then, waiting up to a minute,
           Running (7), Completed (13, every container exited 0) or Error 2 ("service x exited with code N",
           "failed to wait for status: ...").
  remove   remove command, Removing (9), files deleted, wait until nothing is left, Removed (4).
A report is retried every 5 s while Portainer is unreachable or answers 5xx; a 4xx ends it (Go's client).
Beyond Go: the records survive restarts (edge/stacks/store.py); a failed deploy command is tried again with a
back-off doubling from KEELSON_EDGE_STACK_RETRY up to ten times that (CE's Go agent never retries), each try
reported; a failed removal is retried the same way (Go: next loop pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import aiodocker
import aiohttp

from agent.errors import Code, log_failure
from agent.tasks import cancel, supervise
from edge.client import PollError
from edge.stacks import store
from edge.stacks.engines import CommandError, ProjectStatus, StackEngine, command_env
from edge.stacks.payload import StackError, StackRef, parse_stack_payload, remove_project, write_project
from edge.stacks.store import Phase, StackRecord

log = logging.getLogger(__name__)

EDGE_ID_VARIABLE = "PORTAINER_EDGE_ID"
REPORT_RETRY = 5.0
STATUS_POLL = 1.0
ENGINE_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError)


class Status(IntEnum):
    """Portainer's EdgeStackStatusType (api/portainer.go), the values a CE agent sends."""

    DEPLOYMENT_RECEIVED = 1
    ERROR = 2
    ACKNOWLEDGED = 3
    REMOVED = 4
    RUNNING = 7
    DEPLOYING = 8
    REMOVING = 9
    COMPLETED = 13


class StackServer(Protocol):
    """What the manager needs of Portainer (edge/client.py PortainerClient)."""

    async def edge_stack(self, stack_id: int, version: int) -> bytes: ...

    async def set_stack_status(self, stack_id: int, status: int, error: str = "") -> None: ...


def plan(known: Mapping[int, StackRecord], listed: Iterable[StackRef]) -> tuple[list[StackRef], list[int]]:
    """(stacks to fetch: new, new version, or listed again while being removed; known ids to remove)."""
    listed = list(listed)
    ids = {ref.id for ref in listed}
    fetch = [ref for ref in listed
             if (rec := known.get(ref.id)) is None or rec.version != ref.version or rec.phase is Phase.REMOVE]
    remove = [sid for sid, rec in sorted(known.items()) if sid not in ids and rec.phase is not Phase.REMOVE]
    return fetch, remove


def retry_delay(attempts: int, base: float) -> float:
    """Back-off after ``attempts`` failures: base, 2 base, 4 base ... at most 10 base."""
    return min(base * 2 ** max(attempts - 1, 0), base * 10)


class StackManager:
    def __init__(self, server: StackServer, engine: Callable[[], Awaitable[StackEngine]], folder: Path, *,
                 edge_id: str, docker_host: str, retry: float = 30.0, wait_timeout: float = 60.0,
                 active: Callable[[], Awaitable[bool]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.engine = engine
        self.folder = folder
        self.edge_id = edge_id
        self.docker_host = docker_host
        self.retry = retry
        self.wait_timeout = wait_timeout
        self.active = active
        self.clock = clock
        self.records: dict[int, StackRecord] = store.load(folder)
        self._wake = asyncio.Event()
        self._told: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def project_folder(self, stack_id: int) -> Path:
        return self.folder / str(stack_id)

    def start(self) -> None:
        if self._task is None:
            if self.records:
                log.info("Edge stacks known from the last run: %s", ", ".join(
                    f"{r.id} ({r.project} v{r.version}, {r.phase.value})" for r in self.records.values()))
            self._task = supervise(self._run, "edge-stacks")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def _save(self) -> None:
        try:
            await asyncio.to_thread(store.save, self.folder, dict(self.records))
        except OSError as exc:
            log_failure(Code.EDGE_STACK_FAILED, f"cannot store the Edge stack records in {self.folder}: {exc}")

    # --- inside the poll --------------------------------------------------------------------------------

    async def apply(self, listed: tuple[StackRef, ...] | None) -> None:
        """Take one poll answer's list (None: no news). Raises the fetch error that ends this poll's round."""
        if listed is None:
            return
        fetch, remove = plan(self.records, listed)
        changed = False
        for sid in remove:
            record = self.records[sid]
            log.info("Edge stack %d (%s) is no longer listed: removing it", sid, record.project)
            record.phase, record.attempts, record.retry_at = Phase.REMOVE, 0, 0.0
            changed = True
        try:
            for ref in fetch:
                await self._take(ref)
                changed = True
        finally:
            if changed:
                await self._save()
                self._wake.set()

    async def _take(self, ref: StackRef) -> None:
        body = await self.server.edge_stack(ref.id, ref.version)
        old = self.records.get(ref.id)
        try:
            payload = parse_stack_payload(body)
            await asyncio.to_thread(write_project, self.project_folder(ref.id), payload)
        except (StackError, OSError) as exc:
            message = f"failed to write the stack files: {exc}"
            log_failure(Code.EDGE_STACK_FAILED, f"Edge stack {ref.id} v{ref.version}: {message}")
            self.records[ref.id] = StackRecord(ref.id, ref.version, old.name if old else "", Phase.INVALID)
            await self._report(ref.id, Status.ERROR, message)
            return
        if payload.ignored and ref.id not in self._told:
            self._told.add(ref.id)  # once per stack, not per version
            log.warning("Edge stack %d: %s set by the server are Business Edition features Keelson does not "
                        "implement: ignored", ref.id, ", ".join(payload.ignored))
        if old is not None and old.name and old.name != payload.name and old.phase is not Phase.INVALID:
            log.info("Edge stack %d renamed %s -> %s", ref.id, old.project, payload.project)
        self.records[ref.id] = StackRecord(ref.id, ref.version, payload.name, Phase.DEPLOY, str(payload.entry_file),
                                           [[k, v] for k, v in payload.env])
        log.info("Edge stack %d (%s) version %d received (%s)", ref.id, payload.project, ref.version,
                 "new" if old is None else f"was version {old.version}")
        await self._report(ref.id, Status.ACKNOWLEDGED)

    # --- reports ----------------------------------------------------------------------------------------

    async def _report(self, stack_id: int, status: Status, error: str = "") -> None:
        """Until Portainer takes it, answers 4xx (given up) or the agent stops."""
        failures = 0
        while True:
            try:
                await self.server.set_stack_status(stack_id, int(status), error)
                log.info("Edge stack %d: reported %s%s", stack_id, status.name, f" ({error[:200]})" if error else "")
                return
            except PollError as exc:
                if exc.status is not None and exc.status < 500:
                    log_failure(Code.EDGE_STACK_REPORT_FAILED, f"Edge stack {stack_id}: {status.name} refused: {exc}")
                    return
                detail = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                detail = str(exc) or type(exc).__name__
            failures += 1
            if failures == 1 or failures % 12 == 0:  # one line, then one a minute
                log_failure(Code.EDGE_STACK_REPORT_FAILED, f"Edge stack {stack_id}: reporting {status.name} "
                            f"failed, retrying every {REPORT_RETRY:g}s: {detail}", attempts=failures)
            await asyncio.sleep(REPORT_RETRY)

    # --- the worker -------------------------------------------------------------------------------------

    def _next(self) -> tuple[StackRecord | None, float]:
        """(the record to work on now, or None and how long until one is due)."""
        now = self.clock()
        soonest = 3600.0
        for phase in (Phase.REMOVE, Phase.DEPLOY):
            for record in sorted(self.records.values(), key=lambda r: r.id):
                if record.phase is not phase:
                    continue
                if record.retry_at <= now:
                    return record, 0.0
                soonest = min(soonest, record.retry_at - now)
        return None, soonest

    async def _run(self) -> None:
        while True:
            record, wait = self._next()
            if record is not None and (self.active is None or await self.active()):
                if record.phase is Phase.REMOVE:
                    await self._remove(record)
                else:
                    await self._deploy(record)
                continue
            if record is not None:
                wait = 5.0  # not the node that deploys (a Swarm worker or a former leader): look again later
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _env(self, record: StackRecord) -> dict[str, str]:
        return command_env(self.docker_host, [*((k, v) for k, v in record.env), (EDGE_ID_VARIABLE, self.edge_id)])

    def _current(self, record: StackRecord) -> bool:
        """Still the record of its stack (a poll may have replaced it while a command ran)."""
        return self.records.get(record.id) is record

    async def _failed(self, record: StackRecord, what: str, exc: BaseException) -> None:
        record.attempts += 1
        delay = retry_delay(record.attempts, self.retry)
        record.retry_at = self.clock() + delay
        log_failure(Code.EDGE_STACK_FAILED, f"Edge stack {record.id} ({record.project}): {what}: {exc}",
                    attempts=record.attempts, retry_in=round(delay))
        await self._save()

    async def _deploy(self, record: StackRecord) -> None:
        folder = self.project_folder(record.id)
        entry = Path(record.entry)
        env = self._env(record)
        try:
            engine = await self.engine()
        except ENGINE_ERRORS as exc:
            await self._failed(record, "engine unreachable", exc)
            return
        try:
            await engine.validate(folder, entry, env)
        except CommandError as exc:
            if not self._current(record):
                return
            record.phase = Phase.INVALID
            await self._save()
            log_failure(Code.EDGE_STACK_FAILED, f"Edge stack {record.id} ({record.project}) is invalid: {exc}")
            await self._report(record.id, Status.ERROR, f"failed to validate stack: {exc}")
            return
        await self._report(record.id, Status.DEPLOYING)
        log.info("Edge stack %d: deploying %s version %d with %s (attempt %d)", record.id, record.project,
                 record.version, engine.kind, record.attempts + 1)
        try:
            await engine.deploy(folder, entry, record.project, env)
        except CommandError as exc:
            if not self._current(record):
                return
            await self._failed(record, "deploy failed", exc)
            await self._report(record.id, Status.ERROR, f"failed to redeploy stack: {exc}")
            return
        if not self._current(record):
            return  # a newer version arrived meanwhile: the worker deploys that next
        record.phase, record.attempts, record.retry_at = Phase.DEPLOYED, 0, 0.0
        await self._save()
        await self._report(record.id, Status.DEPLOYMENT_RECEIVED)
        outcome = await self._wait(engine, record.project, lambda s: s.state in ("running", "completed", "error"))
        if outcome is None:
            await self._report(record.id, Status.ERROR, "failed to wait for status: context deadline exceeded")
        elif outcome.state == "error":
            await self._report(record.id, Status.ERROR, outcome.error)
        else:
            await self._report(record.id, Status.RUNNING if outcome.state == "running" else Status.COMPLETED)

    async def _wait(self, engine: StackEngine, project: str,
                    done: Callable[[ProjectStatus], bool]) -> ProjectStatus | None:
        """The first status that ``done`` accepts within wait_timeout, else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            try:
                status = await engine.status(project)
                if done(status):
                    return status
            except ENGINE_ERRORS as exc:
                log.debug("status of %s not read: %s", project, exc)
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(STATUS_POLL)

    async def _remove(self, record: StackRecord) -> None:
        if not record.name:  # never had usable files, so nothing was deployed under its name
            del self.records[record.id]
            await self._save()
            await self._report(record.id, Status.REMOVED)
            return
        try:
            engine = await self.engine()
            await engine.remove(record.project, self._env(record))
        except (CommandError, *ENGINE_ERRORS) as exc:
            await self._failed(record, "removal failed", exc)
            return
        await self._report(record.id, Status.REMOVING)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_project, self.project_folder(record.id))
        if await self._wait(engine, record.project, lambda s: s.state == "gone") is None:
            log.warning("Edge stack %d: %s still has containers or services a minute after its removal",
                        record.id, record.project)
        if self._current(record):
            del self.records[record.id]
            await self._save()
        await self._report(record.id, Status.REMOVED)
        log.info("Edge stack %d (%s) removed", record.id, record.project)
