"""Shared bits of the namespace Swarm: constants, the error, command running, waiting, threads."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tools.dockerd import run

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

AGENT_PORT = 9001
STATE_VERSION = 1
MAX_NODES = 50
# Unix socket paths are limited to 107 bytes; the longest one dockerd makes below its root is about this long.
_LONGEST_SOCKET_SUFFIX = len("/exec/containerd/containerd.sock.ttrpc")
# No registry is reachable: with this, a Swarm task uses the local image without trying a pull first (the
# namespaces have no default route, so a pull fails at once anyway; this only makes it deterministic).
DOCKERD_ENV = {"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
# Containers get 3 s (not 10-15 s) to stop when their dockerd stops, so that teardown is quick.
DOCKERD_ARGS = ("--shutdown-timeout", "3")

T = TypeVar("T")


class SwarmError(RuntimeError):
    """Building, using or removing the namespace Swarm failed."""


def parallel(fns: list[Callable[[], T]]) -> list[T]:
    """Run the callables in threads; every one finishes, then the first error (if any) is raised."""
    if not fns:
        return []
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]


def wait_for(pred: Callable[[], bool], deadline: float, message: str, raise_: bool = True,
             interval: float = 0.3) -> bool:
    while True:
        try:
            if pred():
                return True
        except (OSError, subprocess.SubprocessError, RuntimeError):
            pass
        if time.monotonic() >= deadline:
            if raise_:
                raise SwarmError(message or "timed out")
            return False
        time.sleep(interval)


def sh(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command; failure raises SwarmError with its stderr."""
    try:
        return run(cmd, check=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        raise SwarmError(f"{' '.join(cmd)} failed ({exc.returncode}): {(exc.stderr or '').strip()}") from None
    except subprocess.TimeoutExpired:
        raise SwarmError(f"{' '.join(cmd)} did not finish within {timeout}s") from None


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
