"""The engine side of the benchmarks: a private dockerd, agents on it, and the Docker API calls that build the
data sets (containers, a random image, a chatty container) outside any timing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import log
from tools.agentproc import AgentProcess
from tools.dockerd import DOCKER_CLI
from tools.signer import Signer

LABEL = {"keelson.bench": "1"}


class BenchAgent(AgentProcess):
    """AgentProcess at production log level, optionally run from another source tree (the code before a
    change, for same-run before/after ratios). start() records when the process was launched."""

    def __init__(self, docker_host: str, workdir: Path, tree: Path | None = None,
                 env: Mapping[str, str] | None = None, signer: Signer | None = None) -> None:
        super().__init__(docker_host, workdir, env={"LOG_LEVEL": "INFO", **(env or {})}, signer=signer)
        self.tree = tree
        self.launched_at = 0.0

    def start(self, wait: bool = True) -> BenchAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        env = dict(self.env)
        cwd = self.tree or Path(__file__).resolve().parent.parent
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)
        log_file = open(self.log_path, "ab")
        self.launched_at = time.monotonic()
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "agent"], cwd=cwd, env=env, stdout=log_file,
                                     stderr=subprocess.STDOUT)
        log_file.close()
        if wait:
            self.wait_ready()
        return self

    def cli_args(self) -> tuple[list[str], dict[str, str]]:
        """Docker CLI arguments and environment that talk to this agent, signed by its signer."""
        return (["--config", str(self.config_dir), "--tls", "-H", f"tcp://127.0.0.1:{self.port}"],
                {"DOCKER_CERT_PATH": str(self.config_dir)})

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _unix_session(socket_path: str, limit: int = 16) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path, limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=600))


async def _create_containers(socket_path: str, count: int, image: str, concurrency: int) -> int:
    """POST /containers/create (what `docker create` does), `concurrency` at a time; returns how many."""
    made = 0
    async with _unix_session(socket_path, concurrency) as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)

        async def worker() -> None:
            nonlocal made
            while not queue.empty():
                queue.get_nowait()
                body = {"Image": image, "Cmd": ["true"], "Labels": LABEL}
                async with session.post("http://docker/containers/create", json=body) as resp:
                    text = await resp.text()
                    if resp.status != 201:
                        raise RuntimeError(f"container create: HTTP {resp.status}: {text[:300]}")
                made += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return made


def create_containers(socket_path: str, count: int, image: str = "busybox:local", concurrency: int = 8) -> int:
    return asyncio.run(_create_containers(socket_path, count, image, concurrency))


async def _random_tar(total: int, file_size: int = 16 * 2**20) -> AsyncIterator[bytes]:
    """A tar stream of random files adding up to `total` bytes (never held in memory whole)."""
    written = 0
    index = 0
    while written < total:
        size = min(file_size, total - written)
        info = tarfile.TarInfo(f"data/random-{index:04d}.bin")
        info.size = size
        info.mode = 0o644
        info.mtime = int(time.time())
        yield info.tobuf(format=tarfile.USTAR_FORMAT)
        left = size
        while left:
            step = min(left, 2**20)
            yield os.urandom(step)
            left -= step
        pad = (-size) % 512
        if pad:
            yield b"\0" * pad
        written += size
        index += 1
    yield b"\0" * 1024


async def _import_random_image(socket_path: str, repo: str, tag: str, total: int) -> None:
    async with _unix_session(socket_path, 2) as session:
        url = f"http://docker/images/create?fromSrc=-&repo={repo}&tag={tag}"
        async with session.post(url, data=_random_tar(total), headers={"Content-Type": "application/x-tar"},
                                chunked=True) as resp:
            text = await resp.text()
            if resp.status != 200 or '"error' in text:
                raise RuntimeError(f"image import: HTTP {resp.status}: {text[-300:]}")


def import_random_image(socket_path: str, name: str, mib: int) -> None:
    repo, tag = name.split(":")
    asyncio.run(_import_random_image(socket_path, repo, tag, mib * 2**20))


def docker_cli(host: str, *args: str, timeout: float = 600) -> str:
    res = subprocess.run([DOCKER_CLI, "-H", host, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {res.stderr.strip()[:500]}")
    return res.stdout.strip()


def chatty_container(host: str, mib: int) -> str:
    """A finished container whose log holds `mib` MiB of 1000-byte lines (json-file driver); its ID."""
    line = "k" * 999
    cid = docker_cli(host, "create", "--label", "keelson.bench=1", "busybox:local", "sh", "-c",
                     f"yes {line} | head -c {mib * 2**20}")
    docker_cli(host, "start", cid)
    status = docker_cli(host, "wait", cid, timeout=900)
    if status != "0":
        raise RuntimeError(f"chatty container exited {status}")
    return cid


def image_size(host: str, name: str) -> int:
    out = docker_cli(host, "image", "inspect", name, "--format", "{{json .Size}}")
    return int(json.loads(out))


def remove_bench_objects(host: str, images: list[str]) -> None:
    ids = docker_cli(host, "ps", "-aq", "--filter", "label=keelson.bench=1").split()
    for i in range(0, len(ids), 200):
        subprocess.run([DOCKER_CLI, "-H", host, "rm", "-f", *ids[i:i + 200]], capture_output=True, check=False,
                       timeout=300)
    for image in images:
        subprocess.run([DOCKER_CLI, "-H", host, "rmi", "-f", image], capture_output=True, check=False, timeout=300)
    log(f"removed {len(ids)} bench containers and {len(images)} images")


def engine_version(host: str) -> dict[str, Any]:
    return json.loads(docker_cli(host, "version", "--format", "{{json .Server}}"))
