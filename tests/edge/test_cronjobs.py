"""Edge jobs through the host's cron (Go's way): the files as Go writes them, then the cron line run for real."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edge.client import Schedule
from edge.cronjobs import CRON_HEADER, CronJobs, check_cron, cron_file
from edge.schedules import CappedLog, read_log_tail
from tests.edge.conftest import AgentFactory, EdgeStand, agent_log, eventually, start_agent, wait_for

pytestmark = pytest.mark.edge

BUSYBOX = "/bin/busybox"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode().rstrip("=")


def test_cron_file_is_go_s() -> None:
    assert cron_file([(4, "*/5 * * * *")]) == (
        "## This file is managed by the Portainer agent. DO NOT EDIT MANUALLY ALL YOUR CHANGES WILL BE OVERWRITTEN.\n"
        "SHELL=/bin/sh\n"
        "PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin\n"
        "\n"
        "*/5 * * * * root /opt/portainer/scripts/schedule_4 > /opt/portainer/scripts/schedule_4.log 2>&1\n")
    assert len(CRON_HEADER) == 4


@pytest.mark.parametrize("expression", ["* * * * *\n* * * * * root rm -rf /", "* * * * * *", "61 * * * *",
                                        "* * * * * root", "@every 5s", ""])
def test_only_plain_cron_expressions_reach_the_host(expression: str) -> None:
    with pytest.raises(ValueError):
        check_cron(expression)


def test_keywords_and_spacing() -> None:
    assert check_cron("@hourly") == "@hourly"
    assert check_cron(" 0  3 * * 1-5 ") == "0 3 * * 1-5"


async def test_files_follow_the_poll(tmp_path: Path) -> None:
    sent: list[tuple[int, str]] = []

    async def send(job_id: int, content: str) -> None:
        sent.append((job_id, content))

    jobs = CronJobs(tmp_path, send)
    cron = tmp_path / "etc/cron.d/portainer_agent"
    try:
        jobs.apply([Schedule(1, "* * * * *", b64("echo one"), 1), Schedule(2, "0 * * * *", b64("echo two"), 1)])
        await eventually(cron.exists)
        script = tmp_path / "opt/portainer/scripts/schedule_1"
        assert script.read_text() == "echo one"
        assert stat.S_IMODE(script.stat().st_mode) == 0o744
        assert stat.S_IMODE(cron.stat().st_mode) == 0o644
        assert cron.read_text() == cron_file([(1, "* * * * *"), (2, "0 * * * *")])

        jobs.apply([Schedule(2, "0 * * * *", b64("echo two"), 1, collect_logs=True)])  # 1 dropped
        await eventually(lambda: not script.exists())
        assert cron.read_text() == cron_file([(2, "0 * * * *")])
        await eventually(lambda: sent == [(2, "")])  # no run yet: an empty log, as Go sends

        jobs.apply([])
        await eventually(lambda: not cron.exists())
    finally:
        await jobs.close()


async def test_output_is_capped_and_only_the_tail_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    async with CappedLog(path, cap=1000) as out:
        for _ in range(30):
            await out.write(b"x" * 100)
    text = path.read_text()
    assert text.startswith("x" * 1000) and "2000 more bytes of output not kept" in text
    assert read_log_tail(path, cap=50) == text[-50:]
    assert read_log_tail(tmp_path / "missing") == ""


def host_root(tmp_path: Path) -> Path:
    """A tiny host: busybox as /bin/sh, an empty /etc/cron.d, as Go's agent sees the host under /host."""
    if not os.path.exists(BUSYBOX):
        pytest.fail("busybox-static is missing: ./dev.sh installs it")
    root = tmp_path / "host"
    (root / "bin").mkdir(parents=True)
    (root / "etc/cron.d").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    return root


def run_cron_line(root: Path, line: str) -> None:
    """What the host's cron does with a line of /etc/cron.d: the command after the user, by /bin/sh, as root."""
    fields = line.split()
    assert fields[5] == "root"
    command = line.split(" root ", 1)[1]
    subprocess.run(["chroot", str(root), "/bin/sh", "-c", command], check=True, timeout=30)


@pytest.mark.engine
async def test_agent_writes_go_s_files_and_the_host_s_cron_run_reaches_portainer(
        stand: EdgeStand, edge_agents: AgentFactory, tmp_path: Path) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(31, checked_in=True)
    root = host_root(tmp_path)
    # (#!: busybox, the test host's sh, re-runs a script without one through /proc, which this host lacks)
    portainer.add_job(5, "*/10 * * * *", b"#!/bin/sh\necho from-the-host\necho to-stderr >&2\n", [31])
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(31), "EDGE_TUNNEL": "false",
                                          "KEELSON_EDGE_JOB_RUNNER": "cron", "KEELSON_HOST_ROOT": str(root)}))
    cron = root / "etc/cron.d/portainer_agent"
    await wait_for(cron.exists, 20, "the cron file", proc)
    [line] = cron.read_text().splitlines()[len(CRON_HEADER):]
    assert line == ("*/10 * * * * root /opt/portainer/scripts/schedule_5 > "
                    "/opt/portainer/scripts/schedule_5.log 2>&1")

    run_cron_line(root, line)
    assert (root / "opt/portainer/scripts/schedule_5.log").read_text() == "from-the-host\nto-stderr\n"
    portainer.request_logs(5, 31)
    await wait_for(lambda: portainer.logs_for(5, 31), 20, "the job's log at Portainer", proc)
    assert portainer.logs_for(5, 31) == ["from-the-host\nto-stderr\n"]

    portainer.remove_job(5)
    await wait_for(lambda: not cron.exists(), 20, "the cron file removed with the last job", proc)
    assert "Traceback" not in agent_log(proc)
