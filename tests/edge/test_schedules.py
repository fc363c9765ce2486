"""Scheduler: cron loops follow the poll's schedules (added, replaced, removed), logs go back on request."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import pytest

from edge.client import Schedule
from edge.schedules import JOB_LABEL, CappedLog, ContainerJobRunner, Scheduler, validate_schedule
from tests.edge.conftest import eventually

pytestmark = pytest.mark.edge

EVERY_SECOND = "* * * * * *"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode().rstrip("=")


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.block: asyncio.Event | None = None

    async def run(self, job_id: int, script: bytes, output: CappedLog) -> None:
        self.calls.append((job_id, script))
        if self.block is not None:
            await self.block.wait()
        await output.write(f"ran {script.decode()}\n")


async def test_jobs_are_added_replaced_removed_and_logs_sent(tmp_path: Path) -> None:
    runner = FakeRunner()
    sent: list[tuple[int, str]] = []

    async def send(job_id: int, content: str) -> None:
        sent.append((job_id, content))

    scheduler = Scheduler(runner, tmp_path, send)
    try:
        scheduler.apply([Schedule(1, EVERY_SECOND, b64("a"), 1, collect_logs=True)])
        await eventually(lambda: sent == [(1, "")])  # asked before any run: an empty log, as Go sends
        await eventually(lambda: scheduler.log_path(1).exists(), timeout=5)
        assert scheduler.log_path(1).read_text() == "ran a\n"
        scheduler.apply([Schedule(1, EVERY_SECOND, b64("a"), 1, collect_logs=True)])
        await eventually(lambda: sent[-1] == (1, "ran a\n"))
        first = scheduler.jobs[1]

        scheduler.apply([Schedule(1, EVERY_SECOND, b64("b"), 2)])  # new Version: replaced
        assert scheduler.jobs[1] is not first
        assert first.loop_task is not None
        await eventually(first.loop_task.cancelled)
        await eventually(lambda: (1, b"b") in runner.calls, timeout=5)

        second = scheduler.jobs[1]
        scheduler.apply([])  # removed: stops at once and forgets its log
        assert not scheduler.jobs and second.loop_task is not None
        await eventually(second.loop_task.cancelled)
        await eventually(lambda: not scheduler.log_path(1).exists())
    finally:
        await scheduler.close()


async def test_bad_jobs_are_reported_once_and_overlaps_skipped(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    runner = FakeRunner()
    runner.block = asyncio.Event()

    async def send(_job_id: int, _content: str) -> None:
        return None

    scheduler = Scheduler(runner, tmp_path, send)
    try:
        for _ in range(3):
            scheduler.apply([Schedule(7, "61 * * * *", b64("x"), 1), Schedule(8, "* * * * *", "!!", 1)])
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EDGE_JOB_FAILED")]
        assert len(lines) == 2
        assert "invalid cron expression '61 * * * *'" in lines[0] and "not base64" in lines[1]
        assert not scheduler.jobs

        scheduler.apply([Schedule(9, EVERY_SECOND, b64("slow"), 1)])
        await eventually(lambda: any("still running: run skipped" in r.getMessage() for r in caplog.records),
                         timeout=5)
        assert len(runner.calls) == 1
    finally:
        runner.block.set()
        await scheduler.close()


def test_validate_schedule_accepts_cron_and_croniter_seconds() -> None:
    assert validate_schedule(Schedule(1, "*/5 * * * *", b64("echo hi"), 1)) == b"echo hi"
    assert validate_schedule(Schedule(1, "0 0 * * * */10", b64("x"), 1)) == b"x"
    with pytest.raises(ValueError):
        validate_schedule(Schedule(1, "every minute", b64("x"), 1))


def test_job_container_is_confined() -> None:
    runner = ContainerJobRunner(None, "busybox:local", 64 * 1024 * 1024, 0.25, 60)  # type: ignore[arg-type]
    config = runner.container_config(3)
    assert config["Entrypoint"] == ["/bin/sh", "-c", "/portainer_job/schedule_3"]
    assert config["NetworkDisabled"] is True and config["Labels"] == {JOB_LABEL: "3"}
    host = config["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == host["MemorySwap"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 250_000_000
    assert "Binds" not in host and "Mounts" not in host and not host.get("Privileged")
