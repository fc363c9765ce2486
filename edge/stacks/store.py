"""The Edge stacks this agent knows, kept in DATA_PATH/edge_stacks/stacks.json (atomic writes).

The Go agent keeps them in memory only, so after a restart it deploys every listed stack again and never
removes a stack that was dropped while it was down. Here the record survives the restart: a stack already
deployed at its version is left alone, one dropped meanwhile is removed at the first poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

STORE_FILE = "stacks.json"


class Phase(StrEnum):
    DEPLOY = "deploy"
    """Files written and acknowledged; to be deployed (again after a failure, at ``retry_at``)."""
    DEPLOYED = "deployed"
    """The deploy command succeeded at ``version``."""
    INVALID = "invalid"
    """Validation failed: nothing to retry until a new version arrives."""
    REMOVE = "remove"
    """Dropped from the poll answer: to be removed."""


@dataclass
class StackRecord:
    id: int
    version: int
    name: str
    phase: Phase
    entry: str = "docker-compose.yml"
    env: list[list[str]] = field(default_factory=list)
    """The stack's own variables ([name, value]; Business Edition sends them, CE none)."""
    attempts: int = 0
    retry_at: float = 0.0
    """Wall-clock time of the next attempt after a failure (0 = now)."""

    @property
    def project(self) -> str:
        return f"edge_{self.name}"


def load(folder: Path) -> dict[int, StackRecord]:
    path = folder / STORE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    records: dict[int, StackRecord] = {}
    for item in data.get("stacks", []) if isinstance(data, dict) else []:
        with contextlib.suppress(TypeError, ValueError, KeyError):
            env = [[str(k), str(v)] for k, v in item.get("env", [])]
            record = StackRecord(int(item["id"]), int(item["version"]), str(item["name"]), Phase(item["phase"]),
                                 str(item.get("entry", "docker-compose.yml")), env, int(item.get("attempts", 0)),
                                 float(item.get("retry_at", 0.0)))
            records[record.id] = record
    return records


def save(folder: Path, records: dict[int, StackRecord]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"stacks": [{**asdict(r), "phase": r.phase.value} for r in sorted(records.values(),
                                                                                 key=lambda r: r.id)]}
    fd, tmp = tempfile.mkstemp(prefix=f".{STORE_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / STORE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
