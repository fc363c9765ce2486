"""Processes seen through /proc: alive, start time, session members, namespace members, command lines.

One copy for every tool that starts and stops processes (the Swarm harness, the private dockerd), so that
each stops only what it started, by PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def pids_in_netns(ns: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == ns and alive(int(entry.name)):
                    out.append(int(entry.name))
    return out


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    stat = proc_stat(pid)
    return int(stat[19]) if stat else None


def session_members(sid: int) -> list[int]:
    """Living processes whose session id is `sid` (a session we created with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat and int(stat[3]) == sid and stat[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cmdline_mentions(pid: int, text: str) -> bool:
    return any(text in arg for arg in cmdline(pid))


def pids_mentioning(prefix: str) -> list[int]:
    """Living processes with a command-line argument below `prefix` (never this process)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if any(arg.startswith(prefix) or f"={prefix}" in arg for arg in cmdline(pid)) and alive(pid):
                out.append(pid)
    return out


def descendants(pid: int) -> list[int]:
    """Children of ``pid``, recursively (an agent's worker processes and their serf child, sshd's sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None and len(stat) > 1:
            with contextlib.suppress(ValueError):
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_pss_kib(pid: int) -> int:
    """PSS of ``pid`` and all its descendants in KiB (pages forked processes share count once); 0 when gone."""
    total = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (from /proc/PID/stat); 0.0 when gone."""
    ticks = 0
    for p in [pid, *descendants(pid)]:
        stat = proc_stat(p)
        if stat is not None and len(stat) > 12:
            ticks += int(stat[11]) + int(stat[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")
