"""Edge jobs the Go agent's way: scripts and one cron file in the host's root, run by the host's own cron as root.

As portainer/agent edge/scheduler/scheduler.go, under KEELSON_HOST_ROOT (Go: /host, the host's / mounted):
  opt/portainer/scripts/schedule_<id>        the decoded script, mode 0744
  etc/cron.d/portainer_agent                 a header (SHELL, PATH), then per job
      <cron> root /opt/portainer/scripts/schedule_<id> > /opt/portainer/scripts/schedule_<id>.log 2>&1
The file is removed when the poll lists no job. Logs go back as in Go (edge/scheduler/logs.go): when a poll
lists a job with CollectLogs, its schedule_<id>.log is sent ("" when missing), at most its last 1 MiB, read
in a thread. A device moved from the Go agent keeps its jobs: same paths, same lines.
Differences: the file is rewritten whenever a job is added, dropped or changed (Go: only when the count or a
Version changes), the scripts of dropped jobs are deleted, and a job whose cron expression is not five plain
cron fields (or an @keyword) or whose script is not base64 is left out with one EDGE_JOB_FAILED line, so
nothing a server sends can add lines of its own to the host's crontab.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

from croniter import croniter

from agent.errors import Code, log_failure
from agent.tasks import spawn
from edge.client import Schedule
from edge.schedules import LogSender, LogUploads, validate_schedule, write_atomic

log = logging.getLogger(__name__)

CRON_FILE = Path("etc/cron.d/portainer_agent")
SCRIPT_DIR = Path("opt/portainer/scripts")
CRON_HEADER = (
    "## This file is managed by the Portainer agent. DO NOT EDIT MANUALLY ALL YOUR CHANGES WILL BE OVERWRITTEN.",
    "SHELL=/bin/sh",
    "PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin",
    "",
)
_FIELD = re.compile(r"^[0-9A-Za-z*/,?-]+$")
_KEYWORDS = {"@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def check_cron(expression: str) -> str:
    """The expression as the host's cron reads it; ValueError for anything else."""
    text = expression.strip()
    if text in _KEYWORDS:
        return text
    fields = text.split()
    if len(fields) != 5 or not all(_FIELD.match(f) for f in fields) or not croniter.is_valid(" ".join(fields)):
        raise ValueError(f"{expression[:80]!r} is not a five-field cron expression")
    return " ".join(fields)


def cron_line(job_id: int, expression: str) -> str:
    script = f"/{SCRIPT_DIR}/schedule_{job_id}"
    return f"{expression} root {script} > {script}.log 2>&1"


def cron_file(jobs: list[tuple[int, str]]) -> str:
    """The whole file for (id, checked expression) pairs, as Go writes it."""
    return "\n".join([*CRON_HEADER, *(cron_line(i, e) for i, e in jobs), ""])


class CronJobs:
    """Keeps the host's cron file and scripts in step with the latest poll answer."""

    def __init__(self, host_root: Path, send_logs: LogSender) -> None:
        self.host_root = host_root
        self.send_logs = send_logs
        self._wanted: dict[int, tuple[str, bytes, int]] | None = None
        self._written: dict[int, tuple[str, bytes, int]] = {}
        self._invalid: dict[int, tuple[int, str, str]] = {}
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.uploads = LogUploads(send_logs)

    @property
    def cron_path(self) -> Path:
        return self.host_root / CRON_FILE

    def script_path(self, job_id: int) -> Path:
        return self.host_root / SCRIPT_DIR / f"schedule_{job_id}"

    def log_path(self, job_id: int) -> Path:
        return self.host_root / SCRIPT_DIR / f"schedule_{job_id}.log"

    def apply(self, schedules: tuple[Schedule, ...] | list[Schedule]) -> None:
        wanted: dict[int, tuple[str, bytes, int]] = {}
        for schedule in schedules:
            identity = (schedule.version, schedule.cron_expression, schedule.script)
            try:
                wanted[schedule.id] = (check_cron(schedule.cron_expression), validate_schedule(schedule),
                                       schedule.version)
                self._invalid.pop(schedule.id, None)
            except ValueError as exc:
                if self._invalid.get(schedule.id) != identity:  # one line per bad version, not per poll
                    log_failure(Code.EDGE_JOB_FAILED, f"Edge job {schedule.id} left out of the cron file: {exc}",
                                version=schedule.version)
                    self._invalid[schedule.id] = identity
        if wanted != (self._written if self._wanted is None else self._wanted):
            self._wanted = wanted
            if self._writer is None or self._writer.done():
                self._writer = spawn(self._write_loop(), "edge-cron-writer")
            self._wake.set()
        for schedule in schedules:
            if schedule.collect_logs:
                self.uploads.request(schedule.id, self.log_path(schedule.id))

    async def _write_loop(self) -> None:
        while self._wanted is not None:
            wanted, self._wanted = self._wanted, None
            try:
                await asyncio.to_thread(self._write, wanted)
                self._written = wanted
            except OSError as exc:
                log_failure(Code.EDGE_JOB_FAILED, f"cannot write the Edge jobs into {self.host_root}: {exc}")

    def _write(self, wanted: dict[int, tuple[str, bytes, int]]) -> None:
        for job_id in set(self._written) - set(wanted):
            with contextlib.suppress(FileNotFoundError):
                self.script_path(job_id).unlink()
            log.info("Edge job %d removed from the host's cron", job_id)
        for job_id, (_, script, version) in sorted(wanted.items()):
            if self._written.get(job_id) != wanted[job_id]:
                write_atomic(self.script_path(job_id), script, 0o744)
                log.info("Edge job %d (version %d) written to %s", job_id, version, self.script_path(job_id))
        if wanted:
            write_atomic(self.cron_path, cron_file([(i, w[0]) for i, w in sorted(wanted.items())]).encode(), 0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.cron_path.unlink()
                log.info("no Edge jobs: %s removed", self.cron_path)

    async def close(self) -> None:
        """Stops sending; the cron file stays, as the host's cron keeps running the jobs (Go's behaviour)."""
        await self.uploads.close()
        if self._writer is not None:  # a write under way finishes
            with contextlib.suppress(Exception):
                await self._writer
