"""Several worker processes on one port (KEELSON_WORKERS, default: one per available CPU), one agent.

One Python event loop is one core. The supervisor (the process started as `python -m agent`) forks the workers
after the imports, so their code pages are shared, and each listens on the agent port with SO_REUSEPORT: the
kernel spreads the connections. What one agent must have once is kept once:
- worker 0 (the primary) runs what exists once per node: the Serf child and the Swarm watch; it writes the
  cluster view (members, this engine's role and leader flag, the manager set) to `view.json` in the run folder
  whenever it changes, and the other workers follow that file;
- the pinned Portainer key is a file in the run folder, claimed atomically by the first worker whose request
  verified (auth.PinFile); every worker adopts it;
- metrics go through prometheus_client's multiprocess mode (agent/metrics.py);
- the supervisor forwards SIGTERM/SIGINT to every worker and waits for them; a worker that dies after start-up
  is started again (the primary with a new Serf child); one that fails during start-up stops the agent with its
  exit code. The run folder (DATA_PATH/.run, emptied at start) goes with the supervisor.
Edge mode runs one worker: its key, poller and tunnel are one per node and small devices have one core anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.auth import PinFile
from agent.cluster.membership import Member, StaticMembership
from agent.engine import EngineInfo
from agent.errors import Code, log_failure
from agent.lifetime import die_with_parent

log = logging.getLogger(__name__)

VIEW_INTERVAL = 0.2
"""How often the others look whether the view file changed (a stat; the primary writes on each change)."""
VIEW_WAIT = 60.0
"""How long a worker waits at start for the primary's first view before serving with its own engine's."""
RUN_DIR = ".run"
"""Below DATA_PATH: the pin, the cluster view, the metrics files, the workers' ready marks."""
STOP_GRACE = 10.0
RESTART_PAUSE = 1.0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    count: int
    run_dir: Path

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def pin(self) -> PinFile:
        return PinFile(self.run_dir / "pin")

    @property
    def view_path(self) -> Path:
        return self.run_dir / "view.json"

    def ready_path(self, pid: int) -> Path:
        return self.run_dir / f"ready-{pid}"


# ----------------------------------------------------------------------------- the cluster view


def view_of(members: list[Member], info: EngineInfo, managers: frozenset[str] | None) -> bytes:
    return json.dumps({"members": [dataclasses.asdict(m) for m in members], "info": dataclasses.asdict(info),
                       "managers": sorted(managers) if managers is not None else None}, sort_keys=True).encode()


def parse_view(raw: bytes) -> tuple[list[Member], EngineInfo, frozenset[str] | None]:
    data = json.loads(raw)
    managers = data.get("managers")
    return ([Member(**m) for m in data["members"]], EngineInfo(**data["info"]),
            frozenset(managers) if managers is not None else None)


def write_view(path: Path, raw: bytes) -> None:
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_bytes(raw)
    os.replace(aside, path)


async def publish_view(state: Any, path: Path, changed: asyncio.Event) -> None:
    """Primary: write the view at once when ``changed`` is set (the members changed), and when the Swarm role
    changes (looked at every VIEW_INTERVAL)."""
    last = b""
    while True:
        raw = view_of(state.members(), state.info, state.engine_managers)
        if raw != last:
            try:
                await asyncio.to_thread(write_view, path, raw)
                last = raw
            except OSError as exc:
                log_failure(Code.TASK_FAILED, f"cannot write the cluster view for the other workers: {exc}")
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), VIEW_INTERVAL)


def _read(path: Path) -> tuple[float, bytes] | None:
    try:
        return path.stat().st_mtime_ns, path.read_bytes()
    except FileNotFoundError:
        return None


async def follow_view(state: Any, membership: StaticMembership, path: Path, first: asyncio.Event) -> None:
    """Other workers: take the primary's view into this worker's state whenever the file changes."""
    seen: float | None = None
    while True:
        got = await asyncio.to_thread(_read, path)
        if got is not None and got[0] != seen:
            seen = got[0]
            try:
                members, info, managers = parse_view(got[1])
            except (ValueError, KeyError, TypeError) as exc:
                log.debug("cluster view not read: %s", exc)
            else:
                state.swarm_changed(info, managers or frozenset())
                if members != membership.members():
                    membership.replace(members)
                first.set()
        await asyncio.sleep(VIEW_INTERVAL)


# ----------------------------------------------------------------------------- the supervisor


def end_with_parent(parent: int) -> None:
    """A worker whose supervisor is killed (SIGKILL, no forwarding) gets SIGTERM: no orphan keeps the port."""
    if not die_with_parent(parent):  # the supervisor died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)



class Supervisor:
    """Forks ``count`` workers running ``work(slot)`` (which returns an exit code) and keeps them running."""

    def __init__(self, count: int, work: Callable[[WorkerSlot], int], run_dir: Path) -> None:
        self.count = count
        self.work = work
        # One agent per DATA_PATH: what a previous run left (killed without its clean-up) goes first.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o700, parents=True)
        self.run_dir = run_dir
        self.pids: dict[int, int] = {}
        """pid -> slot index"""
        self.stopping = False
        self.code = 0

    def _fork(self, index: int) -> None:
        slot = WorkerSlot(index, self.count, self.run_dir)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                end_with_parent(parent)
                code = self.work(slot)
            except BaseException:  # a worker must never return into the supervisor's loop
                logging.getLogger(__name__).exception("worker %d crashed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = index

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Until SIGTERM/SIGINT (0), or a worker failing before it served (its exit code)."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for index in range(self.count):
                self._fork(index)
            log.info("agent supervisor %d: %d worker processes (KEELSON_WORKERS)", os.getpid(), self.count)
            while not self.stopping:
                self._reap()
                time.sleep(0.2)
        finally:
            self._shutdown()
        return self.code

    def _reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            served = self.run_dir.joinpath(f"ready-{pid}").exists()
            self._mark_dead(pid)
            if self.stopping:
                continue
            if not served:
                log.error("%s worker %d exited with %d before it served: stopping the agent",
                          Code.START_FAILED.value, index, code)
                self.code = code if code > 0 else 1
                self.stopping = True
                return
            log_failure(Code.TASK_FAILED, f"worker {index} (pid {pid}) ended with {code}: starting it again")
            time.sleep(RESTART_PAUSE)
            self._fork(index)

    def _mark_dead(self, pid: int) -> None:
        self.run_dir.joinpath(f"ready-{pid}").unlink(missing_ok=True)
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            from prometheus_client import multiprocess

            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, folder)

    def _shutdown(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.pids and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid:
                    self.pids.pop(pid, None)
                    continue
            time.sleep(0.05)
        for pid in list(self.pids):  # still there after the grace: by PID, ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
