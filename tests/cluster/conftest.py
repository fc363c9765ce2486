"""The namespace Swarm (tools/swarm/) of the cluster tests: built once a session, removed at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tools.swarm import SwarmCluster


def require_swarm_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("the namespace Swarm needs root (network namespaces, veths, iptables)")
    tools = ("dockerd", "nsenter", "unshare", "ip", "iptables")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {missing}: run the suite through ./dev.sh test, which installs them")


@pytest.fixture(scope="session")
def swarm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[SwarmCluster]:
    """A real 3-node Swarm (node1 manager, node2 and node3 workers), each node a network namespace with its
    own dockerd; busybox:local on every node. No agents: `swarm.start_agents()` (indexes are 1-based).
    Removed at the end of the session, also on failure; when a test failed, the dockerd and agent logs are
    kept in `<state_dir>/logs/`."""
    require_swarm_prerequisites()
    cluster = SwarmCluster(tmp_path_factory.mktemp("swarm"), nodes=3)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(keep_logs=request.session.testsfailed > 0)
