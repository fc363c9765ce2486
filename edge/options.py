"""Keelson-only Edge settings (no Go equivalent), read from ``KEELSON_EDGE_*`` variables.

The Go agent's own Edge variables (EDGE_KEY, EDGE_ID, EDGE_INACTIVITY_TIMEOUT, ...) live in agent.config;
these cover what Keelson does differently: the tunnel transport, how Edge jobs are contained, and the
timings tests need to shorten.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.config import parse_go_duration
from agent.errors import Code

TRANSPORTS = ("chisel", "ssh")
_SIZE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class EdgeOptionError(ValueError):
    """A bad KEELSON_EDGE_* value; stops the agent (exit 1) with a CONFIG_INVALID line naming the variable."""

    code = Code.CONFIG_INVALID


@dataclass(frozen=True)
class EdgeOptions:
    transport: str = "chisel"
    """KEELSON_EDGE_TRANSPORT: ``chisel`` (Portainer's tunnel server) or ``ssh`` (the key's tunnel address is a
    plain SSH server; remote forwarding with the poll's credentials, or with KEELSON_EDGE_SSH_KEY)."""
    ssh_key: str = ""
    """KEELSON_EDGE_SSH_KEY: private key file for the ssh transport (password auth when empty)."""
    job_image: str = "busybox:latest"
    """KEELSON_EDGE_JOB_IMAGE: image of the throwaway container each Edge job runs in (needs /bin/sh)."""
    job_memory: int = 128 * 1024**2
    """KEELSON_EDGE_JOB_MEMORY: memory (and memory+swap) limit of a job container (``128m``, ``1g``)."""
    job_cpus: float = 0.5
    """KEELSON_EDGE_JOB_CPUS: CPU limit of a job container (like ``docker run --cpus``)."""
    job_timeout: float = 3600.0
    """KEELSON_EDGE_JOB_TIMEOUT: a run still going after this (Go duration) is killed."""
    ui_timeout: float = 15 * 60.0
    """KEELSON_EDGE_UI_TIMEOUT: the association page closes when no key was given within this (Go: 15m)."""
    poll_interval: float = 5.0
    """KEELSON_EDGE_POLL_INTERVAL: poll interval until the server's ``checkin`` says otherwise (Go: 5s)."""
    poll_max_backoff: float = 60.0
    """KEELSON_EDGE_POLL_MAX_BACKOFF: longest wait between polls while Portainer is unreachable."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeOptions:
        transport = env.get("KEELSON_EDGE_TRANSPORT", "").strip().lower() or cls.transport
        if transport not in TRANSPORTS:
            raise EdgeOptionError(f"KEELSON_EDGE_TRANSPORT: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        ssh_key = env.get("KEELSON_EDGE_SSH_KEY", "")
        if ssh_key and not Path(ssh_key).is_file():
            raise EdgeOptionError(f"KEELSON_EDGE_SSH_KEY: {ssh_key!r} is not a readable file")
        cpus_text = env.get("KEELSON_EDGE_JOB_CPUS", "")
        try:
            cpus = float(cpus_text) if cpus_text else cls.job_cpus
        except ValueError:
            raise EdgeOptionError(f"KEELSON_EDGE_JOB_CPUS: {cpus_text!r} is not a number") from None
        if not 0 < cpus <= 1024:
            raise EdgeOptionError(f"KEELSON_EDGE_JOB_CPUS: {cpus_text!r} must be > 0")
        return cls(
            transport=transport,
            ssh_key=ssh_key,
            job_image=env.get("KEELSON_EDGE_JOB_IMAGE", "") or cls.job_image,
            job_memory=_size(env, "KEELSON_EDGE_JOB_MEMORY", cls.job_memory),
            job_cpus=cpus,
            job_timeout=_duration(env, "KEELSON_EDGE_JOB_TIMEOUT", cls.job_timeout),
            ui_timeout=_duration(env, "KEELSON_EDGE_UI_TIMEOUT", cls.ui_timeout),
            poll_interval=_duration(env, "KEELSON_EDGE_POLL_INTERVAL", cls.poll_interval),
            poll_max_backoff=_duration(env, "KEELSON_EDGE_POLL_MAX_BACKOFF", cls.poll_max_backoff),
        )


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = parse_go_duration(raw)
    except ValueError:
        raise EdgeOptionError(f"{name}: {raw!r} is not a duration (Go syntax, like 15m, 30s, 500ms)") from None
    if value <= 0:
        raise EdgeOptionError(f"{name}: {raw!r} must be a positive duration")
    return value


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _SIZE.match(raw)
    if match is None:
        raise EdgeOptionError(f"{name}: {raw!r} is not a size (like 64m, 1g)")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 6 * 1024**2:  # Docker's own minimum for --memory
        raise EdgeOptionError(f"{name}: {raw!r} is below Docker's 6m minimum")
    return value
