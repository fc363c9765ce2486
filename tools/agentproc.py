"""Run the real agent (`python -m agent`) as a child process for tests, stopped by its PID."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tools.dockerd import DOCKER_CLI
from tools.signer import Signer

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class AgentProcess:
    """One agent on 127.0.0.1:<free port> against a given engine, with a signer paired to it."""

    def __init__(self, docker_host: str, workdir: Path, env: Mapping[str, str] | None = None,
                 signer: Signer | None = None, scheme: str = "https", args: list[str] | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.signer = signer or Signer()
        self.scheme = scheme
        self.args = list(args or [])
        """Command-line flags of the agent (the Go agent's, see agent/config.py FLAGS)."""
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "EDGE", "MTLS_", "KEELSON_"))},
            "DOCKER_HOST": docker_host,
            "AGENT_HOST": "127.0.0.1",
            "AGENT_PORT": str(self.port),
            "DATA_PATH": str(workdir / "data"),
            "LOG_LEVEL": "DEBUG",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_dir = self.signer.write_docker_config(workdir / "docker-config")

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, wait: bool = True) -> AgentProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", *self.args], cwd=REPO, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log()}")
            try:
                req = urllib.request.Request(self.url + "/ping")
                with urllib.request.urlopen(req, context=insecure_context(), timeout=2) as resp:
                    if resp.status == 204:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agent did not answer /ping in {timeout}s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def cli(self, *args: str, input: bytes | str | None = None, check: bool = True,
            timeout: float = 120, config_dir: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """The real Docker CLI through this agent, signed by config.json HttpHeaders."""
        cfg = config_dir or self.config_dir
        env = {**os.environ, "DOCKER_CERT_PATH": str(cfg)}
        env.pop("DOCKER_HOST", None)
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run([DOCKER_CLI, "--config", str(cfg), "--tls", "-H", f"tcp://127.0.0.1:{self.port}",
                              *args], input=data, capture_output=True, timeout=timeout, env=env, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {res.returncode}: {res.stderr.decode()}")
        return res
