"""Session-wide real parts: one private dockerd (in its own network namespace) shared by every engine test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.dockerd import PrivateDockerd, new_run_id


@pytest.fixture(scope="session")
def run_id() -> str:
    """Names unique to this test run, so leftovers of a killed run never collide with it."""
    return new_run_id()


@pytest.fixture(scope="session")
def engine(run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDockerd]:
    """A real dockerd with `busybox:local` imported; stopped by PID and removed at the end, also on failure."""
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is missing: run the suite through ./dev.sh test, which installs docker.io")
    root = Path(f"/tmp/kls-{run_id}/engine")
    dockerd = PrivateDockerd(root=root, netns=f"kls-{run_id}-e", hostname=f"kls-{run_id}")
    try:
        dockerd.start()
        dockerd.import_busybox()
        yield dockerd
    finally:
        dockerd.stop()
        shutil.rmtree(root.parent, ignore_errors=True)
