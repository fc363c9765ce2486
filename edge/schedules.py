"""Edge jobs, sandboxed (KEELSON_EDGE_JOB_RUNNER=container): each run of a schedule in a throwaway container.

Go (edge/scheduler/scheduler.go) writes every script to the HOST (/opt/portainer/scripts/schedule_<id>) and a
line per job into the host's /etc/cron.d, so a job runs as root on the host with its output in
schedule_<id>.log; that is Keelson's default too (edge/cronjobs.py). This runner puts the script in a fresh
container instead: KEELSON_EDGE_JOB_IMAGE, memory and
CPU limits, no network, no mounts, removed afterwards. Which logs go back and when follows Go
(scheduler/logs.go): the output of the latest run is kept (DATA_PATH/edge_jobs/schedule_<id>.log) and is
sent with ``POST .../edge/jobs/<id>/logs`` whenever a poll lists the job with ``CollectLogs`` true
("" when it has not run yet).
Differences: a removed job stops at once (Go rewrites the cron file only when some job is new or changed),
a change of cron expression or script also replaces the job (Go: only Version), and croniter's six-field
form (seconds last) is accepted besides cron's five fields. Cron times are the agent's local time (TZ).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aiodocker
import aiohttp
from croniter import croniter

from agent.errors import Code, log_failure
from agent.tasks import spawn
from edge.client import Schedule

log = logging.getLogger(__name__)

JOB_LABEL = "io.keelson.edge-job"
SCRIPT_DIR = "/portainer_job"
LogSender = Callable[[int, str], Awaitable[None]]


LOG_CAP = 1024 * 1024
"""Output kept of one run, and the most of a log sent to Portainer (its tail)."""
_FLUSH = 64 * 1024


class JobRunner(Protocol):
    async def run(self, job_id: int, script: bytes, output: CappedLog) -> None:
        """Run one script to completion, its combined output (stdout and stderr) written to ``output``."""
        ...


class CappedLog:
    """A run's output written to a file as it comes (in a thread, 64 KiB at a time), at most ``cap`` bytes."""

    def __init__(self, path: Path, cap: int = LOG_CAP) -> None:
        self.path = path
        self.cap = cap
        self.written = 0
        self.dropped = 0
        self._buffer = bytearray()
        self._fh: Any = None

    async def __aenter__(self) -> CappedLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = await asyncio.to_thread(open, self.path, "wb")
        return self

    async def write(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        room = self.cap - self.written - len(self._buffer)
        if room < len(raw):
            self.dropped += len(raw) - max(room, 0)
            raw = raw[:max(room, 0)]
        self._buffer += raw
        if len(self._buffer) >= _FLUSH:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await asyncio.to_thread(self._fh.write, chunk)
            self.written += len(chunk)

    async def __aexit__(self, *exc: object) -> None:
        if self.dropped:
            self._buffer += f"\n[keelson] {self.dropped} more bytes of output not kept (cap {self.cap})\n".encode()
        await self._flush()
        await asyncio.to_thread(self._fh.close)


def read_log_tail(path: Path, cap: int = LOG_CAP) -> str:
    """At most the last ``cap`` bytes of a log ("" when there is none); call it in a thread."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - cap))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class LogUploads:
    """Job logs sent when a poll asks for them (Go: edge/scheduler/logs.go), one upload per job at a time."""

    def __init__(self, send_logs: LogSender) -> None:
        self.send_logs = send_logs
        self._sending: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, job_id: int, path: Path) -> None:
        if job_id in self._sending:
            return
        self._sending.add(job_id)
        task = spawn(self._send(job_id, path), "edge-job-log")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, job_id: int, path: Path) -> None:
        try:
            await send_job_log(self.send_logs, job_id, path)
        finally:
            self._sending.discard(job_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def send_job_log(send_logs: LogSender, job_id: int, path: Path) -> None:
    """One log upload (Go: edge/scheduler/logs.go), failures logged."""
    try:
        content = await asyncio.to_thread(read_log_tail, path)
        await send_logs(job_id, content)
        log.info("Edge job %d log sent (%d bytes)", job_id, len(content))
    except Exception as exc:
        log_failure(Code.EDGE_JOB_FAILED, f"sending the log of Edge job {job_id} failed: {exc}")


def _script_tar(job_id: int, script: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(SCRIPT_DIR.strip("/"))
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        info = tarfile.TarInfo(f"{SCRIPT_DIR.strip('/')}/schedule_{job_id}")
        info.size = len(script)
        info.mode = 0o755
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(script))
    return buf.getvalue()


@dataclass
class ContainerJobRunner:
    """One container per run: no network, memory and CPU limits, no new privileges, removed afterwards."""

    docker: aiodocker.Docker
    image: str
    memory: int
    cpus: float
    timeout: float

    async def _ensure_image(self) -> None:
        try:
            await self.docker.images.inspect(self.image)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
            log.info("pulling Edge job image %s", self.image)
            await self.docker.images.pull(self.image)

    def container_config(self, job_id: int) -> dict[str, Any]:
        return {
            "Image": self.image,
            # sh runs a script without a #! line itself, as cron's /bin/sh -c does on the host.
            "Entrypoint": ["/bin/sh", "-c", f"{SCRIPT_DIR}/schedule_{job_id}"],
            "Cmd": [],
            "Labels": {JOB_LABEL: str(job_id)},
            "NetworkDisabled": True,
            "HostConfig": {
                "NetworkMode": "none",
                "Memory": self.memory,
                "MemorySwap": self.memory,
                "NanoCpus": int(self.cpus * 1e9),
                "PidsLimit": 512,
                "SecurityOpt": ["no-new-privileges"],
            },
        }

    async def run(self, job_id: int, script: bytes, output: CappedLog) -> None:
        await self._ensure_image()
        name = f"keelson-edge-job-{job_id}-{uuid.uuid4().hex[:8]}"
        creating = spawn(self.docker.containers.create(self.container_config(job_id), name=name), "edge-job-create",
                         owned=True)
        try:
            container = await asyncio.shield(creating)
        except asyncio.CancelledError:  # removed or replaced meanwhile: do not leave the container behind
            with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
                await (await creating).delete(force=True)
            raise
        try:
            await container.put_archive("/", _script_tar(job_id, script))
            await container.start()
            note = ""
            try:
                async with asyncio.timeout(self.timeout):
                    result = await container.wait(timeout=None)
                code = result.get("StatusCode")
                if code:
                    log.info("Edge job %d exited with status %s", job_id, code)
            except TimeoutError:
                with contextlib.suppress(aiodocker.DockerError):
                    await container.kill()
                note = f"\n[keelson] job killed after {self.timeout:g}s (KEELSON_EDGE_JOB_TIMEOUT)\n"
            async for chunk in container.log(stdout=True, stderr=True, follow=True):  # streamed, not listed
                await output.write(chunk)
            await output.write(note)
        finally:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)

    async def remove_leftovers(self) -> None:
        """Containers of runs interrupted by a crash or restart of the agent (best effort)."""
        try:
            for container in await self.docker.containers.list(all=True, filters={"label": [JOB_LABEL]}):
                with contextlib.suppress(aiodocker.DockerError):
                    await container.delete(force=True)
                    log.info("removed leftover Edge job container %s", container.id[:12])
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            log.debug("leftover Edge job containers not checked: %s", exc)


def validate_schedule(schedule: Schedule) -> bytes:
    """The decoded script; raises ValueError when the job cannot be run."""
    if not croniter.is_valid(schedule.cron_expression):
        raise ValueError(f"invalid cron expression {schedule.cron_expression!r}")
    text = schedule.script.strip().rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("script is not base64") from None


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write beside ``path`` and rename over it (never half a file, never through a link at ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Job:
    def __init__(self, schedule: Schedule, script: bytes) -> None:
        self.schedule = schedule
        self.script = script
        self.loop_task: asyncio.Task[None] | None = None
        self.run_task: asyncio.Task[None] | None = None
        self.runs = 0


class Scheduler:
    """Keeps one cron loop per job in sync with the latest poll answer."""

    def __init__(self, runner: JobRunner, log_dir: Path, send_logs: LogSender,
                 now: Callable[[], datetime] = datetime.now) -> None:
        self.runner = runner
        self.log_dir = log_dir
        self.send_logs = send_logs
        self.now = now
        self.jobs: dict[int, _Job] = {}
        self._invalid: dict[int, tuple[int, str, str]] = {}
        self.uploads = LogUploads(send_logs)

    def log_path(self, job_id: int) -> Path:
        return self.log_dir / f"schedule_{job_id}.log"

    def apply(self, schedules: tuple[Schedule, ...] | list[Schedule]) -> None:
        wanted = {s.id: s for s in schedules}
        for job_id in list(self.jobs):
            if job_id not in wanted:
                log.info("Edge job %d removed", job_id)
                self._stop(self.jobs.pop(job_id))
                with contextlib.suppress(OSError):
                    self.log_path(job_id).unlink()
        for job_id, schedule in wanted.items():
            current = self.jobs.get(job_id)
            if current is not None and _same(current.schedule, schedule):
                current.schedule = schedule  # CollectLogs may change
            else:
                self._install(schedule, current)
        for schedule in wanted.values():
            if schedule.collect_logs:
                self.uploads.request(schedule.id, self.log_path(schedule.id))

    def _install(self, schedule: Schedule, current: _Job | None) -> None:
        identity = (schedule.version, schedule.cron_expression, schedule.script)
        try:
            script = validate_schedule(schedule)
        except ValueError as exc:
            if self._invalid.get(schedule.id) != identity:  # one line per bad version, not per poll
                log_failure(Code.EDGE_JOB_FAILED, f"Edge job {schedule.id} cannot be scheduled: {exc}",
                            version=schedule.version)
                self._invalid[schedule.id] = identity
            if current is not None:
                self._stop(self.jobs.pop(schedule.id))
            return
        self._invalid.pop(schedule.id, None)
        if current is not None:
            log.info("Edge job %d replaced (version %d -> %d)", schedule.id, current.schedule.version,
                     schedule.version)
            self._stop(current)
        else:
            log.info("Edge job %d scheduled (%s, version %d)", schedule.id, schedule.cron_expression,
                     schedule.version)
        job = _Job(schedule, script)
        job.loop_task = spawn(self._cron_loop(job), f"edge-job-{schedule.id}")
        self.jobs[schedule.id] = job

    @staticmethod
    def _stop(job: _Job) -> None:
        for task in (job.loop_task, job.run_task):
            if task is not None:
                task.cancel()

    async def _cron_loop(self, job: _Job) -> None:
        times = croniter(job.schedule.cron_expression, self.now())
        while True:
            due: datetime = times.get_next(datetime)
            await self._sleep_until(due)
            if job.run_task is not None and not job.run_task.done():
                log_failure(Code.EDGE_JOB_FAILED, f"Edge job {job.schedule.id} still running: run skipped",
                            due=due.isoformat(timespec="seconds"))
                continue
            job.run_task = spawn(self._run(job), f"edge-job-run-{job.schedule.id}")

    async def _sleep_until(self, due: datetime) -> None:
        """Wall-clock wait in steps of at most a minute, so a clock that is set meanwhile is noticed."""
        wait = (due - self.now()).total_seconds()
        while wait > 0:
            await asyncio.sleep(min(wait, 60.0))
            wait = (due - self.now()).total_seconds()

    async def _run(self, job: _Job) -> None:
        job_id = job.schedule.id
        job.runs += 1
        log.info("Edge job %d run %d starting", job_id, job.runs)
        fresh = self.log_path(job_id).with_name(f".schedule_{job_id}.log.{job.runs}")
        try:
            async with CappedLog(fresh) as output:
                try:
                    await self.runner.run(job_id, job.script, output)
                except (asyncio.CancelledError, OSError):
                    raise
                except Exception as exc:
                    log_failure(Code.EDGE_JOB_FAILED, f"Edge job {job_id} could not run: {exc}")
                    await output.write(f"[keelson] the job could not run: {exc}\n")
            if self.jobs.get(job_id) is not job:
                return  # removed or replaced while running
            await asyncio.to_thread(os.replace, fresh, self.log_path(job_id))
            log.info("Edge job %d run %d finished (%d bytes of output)", job_id, job.runs, output.written)
        except OSError as exc:
            log_failure(Code.EDGE_JOB_FAILED, f"cannot store the log of Edge job {job_id}: {exc}")
        finally:
            with contextlib.suppress(OSError):
                fresh.unlink()

    async def close(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        for job in self.jobs.values():
            self._stop(job)
            tasks += [t for t in (job.loop_task, job.run_task) if t is not None]
        self.jobs.clear()
        await self.uploads.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _same(a: Schedule, b: Schedule) -> bool:
    return (a.version, a.cron_expression, a.script) == (b.version, b.cron_expression, b.script)
