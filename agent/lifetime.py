"""Children that end with the process that started them, even when it is killed (SIGKILL, the OOM killer).

Linux's PR_SET_PDEATHSIG sends a child SIGTERM when the thread that forked it ends; it survives the child's
exec. The agent's supervisor sets it on each worker, and each worker on its Serf child: without it a killed
worker's Serf outlives it, keeps the gossip port, and the restarted worker's own Serf cannot bind it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., Any] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _find_prctl()  # resolved here, never between a fork and an exec (no dlopen in a forked child)


def die_with_parent(parent: int) -> bool:
    """In a freshly forked child: get SIGTERM when `parent` ends. False when it has ended already (before the
    call took effect): the caller ends itself."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def child_of_this_process() -> Callable[[], None]:
    """A `preexec_fn` for a child that must not outlive this process (the call resolves nothing: no import,
    no dlopen, between fork and exec)."""
    parent = os.getpid()

    def preexec() -> None:
        if not die_with_parent(parent):
            os._exit(1)  # our signal handlers are still in place before exec: a signal would not end us

    return preexec
