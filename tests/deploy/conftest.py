"""Session-wide parts of the deployment tests: the agent image (built once, cached by content under
.local/image/) and a namespace Swarm of their own (tools/swarm/), since the node-removal test changes it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tools.image import BuiltImage, ImageError, build_image
from tools.swarm import SwarmCluster


def require_root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("the deployment tests need root (debootstrap, network namespaces, dockerd)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {missing}: run the suite through ./dev.sh test, which installs them "
                    "(debootstrap comes from Debian's debootstrap package, dockerd from docker.io)")


@pytest.fixture(scope="session")
def agent_image() -> BuiltImage:
    """keelson/agent built by tools.image (private dockerd, offline build on the debootstrap base); a tree that
    did not change since the last build reuses its saved tarball."""
    require_root_tools("debootstrap", "dockerd", "nsenter", "unshare", "tar")
    try:
        return build_image()
    except ImageError as exc:
        pytest.fail(f"building the agent image failed (./dev.sh image shows the same): {exc}")


@pytest.fixture(scope="session")
def deploy_swarm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[SwarmCluster]:
    """A 3-node namespace Swarm without harness agents (node1 manager), removed at the end of the session."""
    require_root_tools("dockerd", "nsenter", "unshare", "ip", "iptables")
    cluster = SwarmCluster(tmp_path_factory.mktemp("deploy-swarm"), nodes=3)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(keep_logs=request.session.testsfailed > 0)
