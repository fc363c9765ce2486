"""The agent processes of the namespace Swarm: started on each node's network, stopped by PID only."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from tools.procs import alive, session_members, start_time
from tools.swarm.base import REPO_ROOT, SwarmError, parallel, tail, wait_for
from tools.swarm.node import SwarmNode


class AgentProcesses:
    """`python -m agent` per node; mixed into SwarmCluster, whose nodes, state and signer it uses."""

    nodes: list[SwarmNode]
    agent_env: dict[str, str]
    agent_python: str

    def node(self, i: int) -> SwarmNode:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    @property
    def state_file(self) -> Path:
        raise NotImplementedError

    def _save(self) -> None:
        raise NotImplementedError

    def start_agents(self, env: dict[str, str] | None = None, python: str = sys.executable) -> None:
        """Start `python -m agent` on every node, on the node's network; see start_agent."""
        self.agent_env = dict(env or {})
        self.agent_python = python
        for node in self.nodes:
            self.start_agent(node.index)

    def start_agent(self, i: int, env: dict[str, str] | None = None, python: str | None = None) -> None:
        """Start the agent of node i (1-based) with the env and python of the last start_agents (or these)."""
        node = self.node(i)
        if self._agent_alive(node):
            raise SwarmError(f"the agent of {node.name} is already running (PID {node.agent_pid})")
        node.data_path.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            "DOCKER_HOST": node.docker_host,
            "AGENT_PORT": str(node.agent_port),
            # every node's address, as `tasks.<service>` gives every task's in a deployed stack
            "AGENT_CLUSTER_ADDR": ",".join(n.ip for n in self.nodes),
            "KEELSON_ADVERTISE_ADDR": node.ip,
            "DATA_PATH": str(node.data_path),
            "LOG_LEVEL": "DEBUG",
            # The agent shares the node's network namespace with dockerd, whose Swarm gossip owns 7946.
            "KEELSON_SERF_PORT": "7947",
            **self.agent_env,
            **(env or {}),
        }
        cmd = ["nsenter", f"--net={node.netns_path}", python or self.agent_python, "-m", "agent"]
        with open(node.agent_log, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node.agent_proc = proc
        node.agent_pid = proc.pid
        node.agent_start_time = start_time(proc.pid)
        self._save()

    def stop_agent(self, i: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the agent of node i (1-based): `sig` to it (SIGKILL = crash), SIGKILL after `timeout`, then
        SIGKILL to whatever it started (its serf child) in its process group."""
        self._stop_agent_proc(self.node(i), sig, timeout)

    def stop_agents(self) -> None:
        """Stop every agent (in parallel), as stop_agent does."""
        parallel([partial(self._stop_agent_proc, n, signal.SIGTERM, 10.0) for n in self.nodes])

    def _agent_alive(self, node: SwarmNode) -> bool:
        pid = node.agent_pid
        return pid is not None and alive(pid) and start_time(pid) == node.agent_start_time

    def _stop_agent_proc(self, node: SwarmNode, sig: signal.Signals, timeout: float) -> None:
        pid = node.agent_pid
        if pid is None:
            return
        ours = self._agent_alive(node)
        if ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            wait_for(lambda: not self._agent_alive(node), time.monotonic() + timeout, "", raise_=False)
            if self._agent_alive(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # What it started (its serf child) stays in its session. The kernel hands out no PID that is still
        # a session id, so while such members live the number is ours; a living PID that started at another
        # time is not.
        if ours or not alive(pid):
            for child in session_members(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        if node.agent_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.agent_proc.wait(timeout=5)
            node.agent_proc = None
        if ours or not alive(pid):
            wait_for(lambda: not alive(pid) and not session_members(pid), time.monotonic() + 5, "",
                     raise_=False)
        node.agent_pid = None
        node.agent_start_time = None
        if self.state_file.exists():
            self._save()

    def agent_request(self, i: int, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 5.0,
                      signed: bool = True) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request to node i's agent (TLS not verified, signed by the cluster's Signer)."""
        node = self.node(i)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(node.ip, node.agent_port, timeout=timeout, context=ctx)
        try:
            hdrs = {**(self.headers() if signed else {}), **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k: v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def wait_agents(self, timeout: float = 90.0, in_a_row: int = 4) -> dict[str, list[dict[str, Any]]]:
        """Poll `GET /agents` on every node until each lists all N NodeNames on `in_a_row` new connections in
        a row (an agent has a worker process per CPU, each answering some connections); returns the answers."""
        want = {n.name for n in self.nodes}
        answers: dict[str, list[dict[str, Any]]] = {}
        streak: dict[str, int] = {}
        last: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.name in answers:
                    continue
                if node.agent_pid is not None and not self._agent_alive(node):
                    raise SwarmError(f"the agent of {node.name} exited; {node.agent_log}:\n"
                                     f"{tail(node.agent_log)}")
                try:
                    status, _, body = self.agent_request(node.index, "GET", "/agents", timeout=3,
                                                         headers={"Connection": "close"})
                    if status != 200:
                        last[node.name] = f"HTTP {status}: {body[:200]!r}"
                        streak[node.name] = 0
                        continue
                    agents = json.loads(body)
                    names = {a.get("NodeName") for a in agents if isinstance(a, dict)}
                    if names == want:
                        streak[node.name] = streak.get(node.name, 0) + 1
                        if streak[node.name] >= in_a_row:
                            answers[node.name] = agents
                    else:
                        streak[node.name] = 0
                        last[node.name] = f"lists {sorted(str(n) for n in names)}"
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    streak[node.name] = 0
                    last[node.name] = f"{type(exc).__name__}: {exc}"
            if len(answers) == len(self.nodes):
                return answers
            if time.monotonic() > deadline:
                detail = "; ".join(f"{k}: {v}" for k, v in sorted(last.items()) if k not in answers)
                raise SwarmError(f"agents not all answering with {sorted(want)} after {timeout}s: {detail}")
            time.sleep(0.2)
