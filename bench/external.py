"""The reference proxies and tools of the benchmarks: Debian's HAProxy (TLS in front of the Docker socket)
and Debian's hey (a Go load generator, for TCP targets)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from agent.tls import self_signed_pem
from agent.workers import available_cpus
from bench.common import stop_pid
from tools.agentproc import free_port


class _Reference:
    """A reference server of the per-request benchmarks: TLS on 127.0.0.1:<free port> in front of the Docker
    socket, run as our child and stopped by PID; `workers` threads or processes, one per available CPU by
    default, as the agent runs one worker process per CPU (KEELSON_WORKERS)."""

    name = "reference"

    def __init__(self, workdir: Path, socket_path: str, workers: int | None = None) -> None:
        self.workdir = workdir
        self.socket_path = socket_path
        self.workers = workers or available_cpus()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def _launch(self, cmd: list[str], cwd: Path | None = None) -> None:
        """Start `cmd` (output to WORKDIR/NAME.log) and wait until the port takes connections."""
        log_path = self.workdir / f"{self.name}.log"
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within 10 s")

    def cli_args(self) -> tuple[list[str], dict[str, str]]:
        """Docker CLI arguments and environment that talk to this server (TLS, not verified, as for the agent;
        the CLI finds the self-signed certificate as `ca.pem` in its cert path)."""
        return ["--tls", "-H", f"tcp://127.0.0.1:{self.port}"], {"DOCKER_CERT_PATH": str(self.workdir)}

    def stop(self) -> None:
        stop_pid(self.proc)


class HAProxy(_Reference):
    """HAProxy terminating TLS (its own self-signed certificate) on 127.0.0.1:<free port> and proxying to a
    unix socket with keep-alive on both sides. Its config is written here; it runs in the foreground (-db).
    One thread per worker (by default one per available CPU, HAProxy's own default)."""

    name = "haproxy"

    def config(self) -> str:
        return f"""global
    maxconn 4096
    nbthread {self.workers}
    tune.ssl.default-dh-param 2048

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option http-keep-alive
    http-reuse always

frontend keelson_bench
    bind 127.0.0.1:{self.port} ssl crt {self.workdir / "haproxy.pem"}
    default_backend docker

backend docker
    server engine unix@{self.socket_path}
"""

    def start(self) -> HAProxy:
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("haproxy is missing (./dev.sh bench installs it: apt-get install -y haproxy)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_pem(["127.0.0.1"])
        (self.workdir / "ca.pem").write_bytes(cert)  # self-signed: its own CA, for the Docker CLI's cert path
        pem = self.workdir / "haproxy.pem"
        pem.write_bytes(cert + key)
        pem.chmod(0o600)
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self.config())
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config refused: {check.stdout}{check.stderr}")
        self._launch([binary, "-db", "-f", str(cfg)])
        return self


class AsyncioRelay(_Reference):
    """bench/relay.py, the floor of a Python asyncio server, on 127.0.0.1:<free port>: TLS (its own
    self-signed certificate) piped byte for byte to the Docker socket, one process per worker."""

    name = "relay"
    options: tuple[str, ...] = ()

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_pem(["127.0.0.1"])
        (self.workdir / "cert.pem").write_bytes(cert)
        (self.workdir / "ca.pem").write_bytes(cert)  # self-signed: its own CA, for the Docker CLI's cert path
        (self.workdir / "key.pem").write_bytes(key)
        (self.workdir / "key.pem").chmod(0o600)
        self._launch([sys.executable, "-m", "bench.relay", "--cert", str(self.workdir / "cert.pem"),
                      "--key", str(self.workdir / "key.pem"), "--socket", self.socket_path,
                      "--port", str(self.port), "--processes", str(self.workers), *self.options],
                     cwd=Path(__file__).resolve().parent.parent)
        return self


class CheckedRelay(AsyncioRelay):
    """bench/relay.py --checks: the relay plus what the agent cannot leave out of a request (parse, signature,
    target, headers), with the agent's own code and nothing around it."""

    name = "checked_relay"
    options = ("--checks",)


def hey(url: str, headers: dict[str, str], concurrency: int, requests: int, timeout: float = 120.0,
        rate: float | None = None) -> dict[str, Any]:
    """Debian's hey against a TCP URL (TLS unverified): requests/s, p50, p99. Bounded by `requests` and by
    `timeout` seconds (the child is killed past it). With `rate`, the connections together send at most that
    many requests per second (hey's per-connection -q)."""
    binary = shutil.which("hey")
    if binary is None:
        return {"skipped": "hey is missing (./dev.sh bench installs it)"}
    cmd = [binary, "-n", str(requests), "-c", str(concurrency), "-t", "30"]
    if rate is not None:
        cmd += ["-q", f"{rate / concurrency:g}"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"hey did not finish within {timeout}s"}
    return parse_hey(res.stdout)


def parse_hey(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    for line in text.splitlines():
        m2 = re.match(r"^\s*(\d+)% in ([\d.]+) secs", line)
        if m2 and m2.group(1) in ("50", "99"):
            out[f"p{m2.group(1)}_ms"] = round(float(m2.group(2)) * 1000, 3)
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)
    out["statuses"] = {c: int(n) for c, n in codes}
    errors = re.search(r"Error distribution:(.*)", text, re.S)
    out["errors"] = errors.group(1).strip()[:300] if errors else ""
    return out
