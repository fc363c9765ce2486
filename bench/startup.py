"""Scenario 5: start-up time (process launch to the first 204 on /ping) and idle RSS of an agent on a standalone
engine, beside two baselines measured the same way in the same run: a bare Python interpreter importing
the agent's libraries (aiohttp, aiodocker, cryptography) and HAProxy idle."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Sizes, agent_memory_kib, log, median, ratio, rss_kib, stop_pid
from bench.engine import BenchAgent
from bench.external import HAProxy

_IMPORTS = "import aiohttp, aiodocker, cryptography.hazmat.primitives.asymmetric.ec, prometheus_client"


def _ping(port: int) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=1, context=ctx)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status
    finally:
        conn.close()


def _start_once(docker_host: str, workdir: Path, idle_seconds: float,
                tree: Path | None = None) -> tuple[float, float]:
    agent = BenchAgent(docker_host, workdir, tree=tree)
    agent.start(wait=False)
    try:
        deadline = agent.launched_at + 60
        while True:
            assert agent.proc is not None
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {agent.log()}")
            try:
                if _ping(agent.port) == 204:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not answer /ping within 60 s")
            time.sleep(0.005)
        started = time.monotonic() - agent.launched_at
        time.sleep(idle_seconds)
        return started, agent_memory_kib(agent.pid) / 1024  # PSS over the supervisor and its workers
    finally:
        agent.stop()


def _python_baseline(idle_seconds: float) -> tuple[float, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", f"{_IMPORTS}; print('ready', flush=True); "
                             f"import time; time.sleep({idle_seconds + 30})"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        started = time.monotonic() - t0
        time.sleep(idle_seconds)
        return started, rss_kib(proc.pid) / 1024
    finally:
        stop_pid(proc)


def run(docker_host: str, socket_path: str, workdir: Path, sizes: Sizes, tree: Path | None = None) -> dict[str, Any]:
    idle = 1.0 if sizes.quick else 3.0
    starts: list[float] = []
    rss: list[float] = []
    py_starts: list[float] = []
    py_rss: list[float] = []
    before: list[tuple[float, float]] = []
    for rep in range(sizes.startup_reps):
        s, r = _start_once(docker_host, workdir / f"agent{rep}", idle)
        starts.append(s)
        rss.append(r)
        ps, pr = _python_baseline(idle)
        py_starts.append(ps)
        py_rss.append(pr)
        if tree is not None:
            before.append(_start_once(docker_host, workdir / f"before{rep}", idle, tree))
        log(f"startup rep {rep + 1}: agent {s * 1000:.0f} ms to /ping, idle RSS {r:.1f} MiB; "
            f"python+imports {ps * 1000:.0f} ms, {pr:.1f} MiB")
    haproxy = HAProxy(workdir / "haproxy-idle", socket_path).start()
    try:
        time.sleep(idle)
        assert haproxy.proc is not None
        haproxy_rss = rss_kib(haproxy.proc.pid) / 1024
    finally:
        haproxy.stop()
    out: dict[str, Any] = {
        "agent_start_ms": round(median(starts) * 1000, 1),
        "agent_start_runs_ms": [round(s * 1000, 1) for s in starts],
        "agent_idle_rss_mib": round(median(rss), 1),
        "python_imports_start_ms": round(median(py_starts) * 1000, 1),
        "python_imports_idle_rss_mib": round(median(py_rss), 1),
        "haproxy_idle_rss_mib": round(haproxy_rss, 1),
        "start_agent/python_imports": ratio(median(starts), median(py_starts)),
        "rss_agent/python_imports": ratio(median(rss), median(py_rss)),
        "rss_agent/haproxy": ratio(median(rss), haproxy_rss),
    }
    if before:
        out["agent_before_start_ms"] = round(median([b[0] for b in before]) * 1000, 1)
        out["agent_before_idle_rss_mib"] = round(median([b[1] for b in before]), 1)
    return out
