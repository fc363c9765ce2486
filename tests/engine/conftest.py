"""One agent process on the session's private dockerd, driven by the real Docker CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.agentproc import AgentProcess
from tools.dockerd import PrivateDockerd


@pytest.fixture(scope="session")
def agent(engine: PrivateDockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = AgentProcess(engine.host, tmp_path_factory.mktemp("agent"))
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def fresh_agent(engine: PrivateDockerd, tmp_path: Path) -> Iterator[AgentProcess]:
    """An agent nobody has paired with yet (for pinning tests)."""
    proc = AgentProcess(engine.host, tmp_path / "agent")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
