"""Several worker processes behind one agent port: one pin, one set of metrics, restarts, one stop."""

from __future__ import annotations

import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.engine.test_versions import poll_until
from tools.agentproc import AgentProcess, insecure_context
from tools.dockerd import PrivateDockerd
from tools.procs import cmdline, descendants
from tools.signer import Signer

pytestmark = pytest.mark.engine


def workers(proc: AgentProcess) -> list[int]:
    assert proc.proc is not None
    return [p for p in descendants(proc.proc.pid) if "serf" not in " ".join(cmdline(p))]


def where_is(pid: int) -> str:
    """A process's state, kernel wait channel and Python stack (py-spy, a dev extra), for a failure message."""
    import shutil
    import subprocess

    out = []
    for name in ("status", "wchan", "stack"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError as exc:
            text = repr(exc)
        out.append(next((line for line in text.splitlines() if line.startswith("State:")), text)
                   if name == "status" else f"{name}: {text.strip()}")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        out.append(dump.stdout + dump.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        out.append(f"py-spy: {exc!r}")
    return "\n".join(out)


def get(proc: AgentProcess, path: str, signer: Signer, ctx: ssl.SSLContext) -> int:
    """One request on a new connection (so that the kernel may hand it to either worker)."""
    request = urllib.request.Request(proc.url + path, headers={**signer.headers(), "Connection": "close"})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_workers_share_one_pin_one_metrics_and_come_back(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "agent", env={"KEELSON_WORKERS": "3"})
    proc.start()
    ctx = insecure_context()
    try:
        first = workers(proc)
        assert len(first) == 3, first
        portainer, intruder = Signer(), Signer()
        assert all(get(proc, "/version", portainer, ctx) == 200 for _ in range(30))
        # The first key pinned by any worker is the pin of every worker.
        assert [get(proc, "/version", intruder, ctx) for _ in range(30)] == [403] * 30
        request = urllib.request.Request(proc.url + "/metrics", headers=portainer.headers())
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            metrics = resp.read().decode()
        served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("keelson_requests_total{") and 'route="local"' in line)
        assert served >= 30, "the counts of every worker are summed"

        os.kill(first[1], signal.SIGKILL)
        # On failure: the supervisor's and workers' own account of the restart, and where the supervisor is.
        assert poll_until(lambda: len(workers(proc)) == 3 and first[1] not in workers(proc), 30), \
            (first, workers(proc), proc.log(), where_is(proc.proc.pid))
        assert all(get(proc, "/version", portainer, ctx) == 200 for _ in range(30))
        assert "TASK_FAILED worker 1" in proc.log()
    finally:
        kids = workers(proc)
        started = time.monotonic()
        proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0
    assert time.monotonic() - started < 10
    assert not [p for p in kids if Path(f"/proc/{p}").exists()], "every worker ended with the agent"


def test_a_worker_that_cannot_start_stops_the_agent(engine: PrivateDockerd, tmp_path: Path) -> None:
    proc = AgentProcess(engine.host, tmp_path / "agent", env={"KEELSON_WORKERS": "2", "AGENT_HOST": "192.0.2.1"})
    proc.start(wait=False)
    assert proc.proc is not None
    assert poll_until(lambda: proc.proc is not None and proc.proc.poll() is not None, 30)
    assert proc.proc.returncode == 1
    assert "START_FAILED" in proc.log()
    assert "Traceback" not in proc.log()
