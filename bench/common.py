"""Shared pieces of the benchmarks: statistics, memory sampling, child processes, result records."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TMP = RESULTS / "tmp"
PY = sys.executable


RELAY = "asyncio_relay"
"""The name of bench/relay.py among the targets: TLS piped byte for byte to the socket, the floor of a Python
asyncio server."""
CHECKED = "checked_relay"
"""bench/relay.py --checks among the targets: the relay plus the agent's per-request checks with the agent's own
code (request head parsed, signature, target, headers) and nothing else: the floor of any agent in Python."""
REFERENCES = ("haproxy", RELAY)
"""Servers that move the same bytes through TLS without the agent's work: HAProxy (C, OpenSSL) shows what TLS
itself costs here, the asyncio relay what TLS in asyncio costs."""
RELAYS = (RELAY, CHECKED)
"""The Python floors (bench/relay.py without and with --checks), compared with HAProxy."""
REQUEST_REFERENCES = ("haproxy", *RELAYS)
"""The references of the per-request scenario: also the relay with the agent's checks."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence; 0.0 for an empty one."""
    if not values:
        return 0.0
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ratio(a: float, b: float) -> float:
    """a / b rounded to 3 digits; 0.0 when b is not positive (a missing baseline)."""
    return round(a / b, 3) if b > 0 else 0.0


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def agent_memory_kib(pid: int) -> int:
    """An agent's memory: PSS summed over the process started and all its children (its worker processes and
    the Serf agent), so pages the forked workers share count once. 0 when it is gone."""
    from tools.procs import tree_pss_kib

    return tree_pss_kib(pid)


class RssSampler:
    """Samples VmRSS of one PID (or what `measure` says of it) in a thread every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.02, measure: Callable[[int], int] | None = None) -> None:
        self.pid = pid
        self.measure = measure or rss_kib
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.measure(self.pid)
            if value:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mib(self) -> float:
        return round(max(self.samples) / 1024, 1) if self.samples else 0.0

    @property
    def first_mib(self) -> float:
        return round(self.samples[0] / 1024, 1) if self.samples else 0.0


def run_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Any:
    """Run a child that prints one JSON document on its last stdout line; return it (raise on failure)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or REPO,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {res.returncode}: {res.stderr[-2000:]}")
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])}... printed nothing: {res.stderr[-2000:]}")
    return json.loads(lines[-1])


def stop_pid(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop a child we started, by its PID: SIGTERM, then SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class Sizes:
    """Every size a scenario uses; `quick()` is the small set a test can afford."""

    quick: bool = False
    containers: int = 100            # scenario 1: containers listed by /containers/json
    requests_c1: int = 1500          # scenario 1: request bound at concurrency 1
    requests_c64: int = 6000         # scenario 1: request bound at concurrency 64
    seconds: float = 5.0             # scenario 1: time bound of one load run
    image_mib: int = 1024            # scenario 2: size of the random image
    logs_mib: int = 256              # scenario 2: log output of the chatty container
    stream_reps: int = 3             # scenario 2: transfers per target
    swarm_nodes: int = 3             # scenario 3
    swarm_containers: int = 1000     # scenario 3: containers per node
    fanout_reps: int = 15            # scenario 3: requests per target
    fanout_deadline: str = "2s"      # scenario 3: KEELSON_FANOUT_TIMEOUT
    sim_nodes: list[int] = field(default_factory=lambda: [10, 50, 100, 200])
    sim_containers: int = 100        # scenario 4: fake containers per simulated engine
    sim_reps: int = 8                # scenario 4: fan-out requests per size
    startup_reps: int = 5            # scenario 5
    profile_seconds: float = 8.0     # scenario 6

    @classmethod
    def small(cls) -> Sizes:
        return cls(quick=True, containers=10, requests_c1=150, requests_c64=600, seconds=1.5, image_mib=32,
                   logs_mib=8, stream_reps=1, swarm_containers=20, fanout_reps=3, sim_nodes=[3, 6],
                   sim_containers=10, sim_reps=3, startup_reps=2, profile_seconds=2.0)


@contextlib.contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        store[key] = round(time.monotonic() - t0, 1)
