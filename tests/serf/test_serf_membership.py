"""SerfMembership against the real serf binary: join, tags, departure, crash recovery."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from agent.cluster.membership import ROLE_MANAGER, ROLE_WORKER, Member, find_member
from agent.cluster.serf import (
    SerfError,
    SerfMembership,
    choose_profile,
    normalize_join_address,
    resolve_join_addresses,
)
from tests.serf.conftest import NodeFactory, free_address, wait_until


def addr(node: SerfMembership) -> str:
    return f"{node.bind_ip}:{node.bind_port}"


def names(node: SerfMembership) -> set[str]:
    return {m.node_name for m in node.members()}


async def wait_sees(node: SerfMembership, expected: set[str]) -> None:
    await wait_until(lambda: names(node) == expected, f"{node.node_name} sees exactly {sorted(expected)}")


def has(node: SerfMembership, node_name: str, **fields: object) -> bool:
    """Whether ``node`` sees ``node_name`` with these Member field values (safe to poll)."""
    found = find_member(node.members(), node_name)
    return found is not None and all(getattr(found, k) == v for k, v in fields.items())


async def three_nodes(make_node: NodeFactory) -> list[SerfMembership]:
    n1 = await make_node("n1", role=ROLE_MANAGER, is_leader=True)
    n2 = await make_node("n2", role=ROLE_MANAGER, agent_port=9002)
    n3 = await make_node("n3", role=ROLE_WORKER, engine_status="standalone")
    assert await n2.join([addr(n1)]) == 1
    assert await n3.join([addr(n1), addr(n2)]) == 2
    for node in (n1, n2, n3):
        await wait_sees(node, {"n1", "n2", "n3"})
    return [n1, n2, n3]


async def test_three_nodes_see_each_other_with_tag_fields(make_node: NodeFactory) -> None:
    n1, n2, n3 = await three_nodes(make_node)
    expected = {
        "n1": Member("n1", n1.bind_ip, 9001, ROLE_MANAGER, is_leader=True),
        "n2": Member("n2", n2.bind_ip, 9002, ROLE_MANAGER),
        "n3": Member("n3", n3.bind_ip, 9001, ROLE_WORKER, engine_status="standalone"),
    }
    for node in (n1, n2, n3):
        assert {m.node_name: m for m in node.members()} == expected
        assert node.serf_node_name.startswith(f"{node.node_name}-test-")


async def test_tags_propagate_and_listeners_fire(make_node: NodeFactory) -> None:
    n1, n2, n3 = await three_nodes(make_node)
    seen: list[list[Member]] = []
    n1.subscribe(seen.append)

    await n3.set_tags({"EdgeKeySet": "set"})
    assert has(n3, "n3", edge_key_set=True)  # its own view is refreshed at once
    await wait_until(lambda: has(n1, "n3", edge_key_set=True), "n1 sees EdgeKeySet of n3")
    assert any(m.node_name == "n3" and m.edge_key_set for ms in seen for m in ms), "listener was not called"

    await n1.set_tags({"NodeIsLeader": ""})  # an empty value deletes the tag
    await wait_until(lambda: has(n2, "n1", is_leader=False), "n2 sees n1 no longer leader")


async def test_closed_node_is_seen_gone(make_node: NodeFactory) -> None:
    n1, n2, n3 = await three_nodes(make_node)
    pid = n3.pid
    assert pid is not None
    await n3.close()
    assert n3.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: our own child, checked by its PID
    for node in (n1, n2):
        await wait_sees(node, {"n1", "n2"})
    # it left (a graceful leave, gossiped at once), rather than failing after the others' probes gave up
    for node in (n1, n2):
        await wait_until(lambda node=node: (node._known.get(n3.serf_node_name) is not None  # type: ignore[misc]
                                            and node._known[n3.serf_node_name].status == "left"),
                         f"{node.node_name} sees n3 as left")


async def test_killed_child_is_restarted_and_rejoins(make_node: NodeFactory) -> None:
    n1, n2, n3 = await three_nodes(make_node)
    await n2.set_tags({"EdgeKeySet": "set"})
    old_pid = n2.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)

    await wait_until(lambda: n2.restarts == 1 and n2.pid not in (None, old_pid), "n2 has a new serf child")
    for node in (n2, n1, n3):
        await wait_sees(node, {"n1", "n2", "n3"})
    # The remembered tag came back with the new child.
    expected = Member("n2", n2.bind_ip, 9002, ROLE_MANAGER, edge_key_set=True)
    await wait_until(lambda: find_member(n1.members(), "n2") == expected, "n1 sees n2 with its tags")
    # And the new child takes RPC commands.
    await n2.set_tags({"EdgeKeySet": ""})
    await wait_until(lambda: has(n3, "n2", edge_key_set=False), "n3 sees the new tags")


async def test_failed_join_is_logged_not_fatal(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_node("alone", probe_timeout=0.2, probe_interval=1.0)
    assert node.profile == "local"  # and serf accepted the config file, or start() would have failed
    nobody = free_address()  # nothing listens there
    with caplog.at_level(logging.WARNING):
        assert await node.join([f"{nobody[0]}:{nobody[1]}"]) == 0
    assert "CLUSTER_JOIN_FAILED" in caplog.text
    assert names(node) == {"alone"}
    assert node.members()[0].ip == node.bind_ip


async def test_missing_binary_fails_start(caplog: pytest.LogCaptureFixture) -> None:
    node = SerfMembership("x", "127.0.83.1", serf_binary="/nonexistent/serf")
    try:
        with pytest.raises(SerfError):
            await node.start()
    finally:
        await node.close()
    assert "CLUSTER_SERF_FAILED" in caplog.text


async def test_resolve_join_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    answers = {"tasks.agent": ["10.0.1.5", "10.0.1.6", "10.0.1.5"], "other": ["10.0.2.1"]}

    async def fake_getaddrinfo(host: str, port: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host not in answers:
            raise OSError(f"unknown host {host}")
        return [(2, 1, 6, "", (ip, 0)) for ip in answers[host]]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    assert await resolve_join_addresses("tasks.agent") == ["10.0.1.5", "10.0.1.6"]
    assert await resolve_join_addresses(" 10.0.0.9, other:8000 ,tasks.agent") == [
        "10.0.0.9",
        "10.0.2.1:8000",
        "10.0.1.5",
        "10.0.1.6",
    ]
    with pytest.raises(OSError):
        await resolve_join_addresses("missing")


async def test_resolve_join_addresses_real_localhost() -> None:
    assert "127.0.0.1" in await resolve_join_addresses("localhost")


def test_address_and_profile_helpers() -> None:
    assert normalize_join_address("10.0.0.1") == "10.0.0.1:7946"
    assert normalize_join_address("10.0.0.1:8000") == "10.0.0.1:8000"
    assert normalize_join_address("fd00::1") == "[fd00::1]:7946"
    assert normalize_join_address("[fd00::1]:8000") == "[fd00::1]:8000"
    assert normalize_join_address("tasks.agent") == "tasks.agent:7946"
    assert choose_profile(0.5, 1.0) == "lan"
    assert choose_profile(0.2, 1.0) == "local"
    assert choose_profile(3.0, 5.0) == "wan"
    assert choose_profile(2.0, 4.0) == "wan"


async def test_a_node_alone_keeps_joining_until_the_others_exist(make_node: NodeFactory) -> None:
    """Agents of a global service start together: a join that finds nobody is retried while alone."""
    lonely = await make_node("early")
    seen: list[str] = []  # what the "DNS name" resolves to: nothing at first, like tasks.<service>

    async def resolve() -> list[str]:
        if not seen:
            raise OSError("name does not resolve yet")
        return list(seen)

    lonely.keep_joining(resolve, interval=0.2, max_interval=0.5)
    late = await make_node("late")
    seen.append(f"{late.bind_ip}:{late.bind_port}")
    await wait_until(lambda: {m.node_name for m in lonely.members()} == {"early", "late"},
                     "the early node found the late one")
    await wait_until(lambda: {m.node_name for m in late.members()} == {"early", "late"}, "and the other way")


_OWNER = """
import asyncio, sys
from pathlib import Path
from agent.cluster.serf import SerfMembership

async def main() -> None:
    node = SerfMembership(node_name="owner", bind_ip=sys.argv[1], bind_port=int(sys.argv[2]),
                          data_dir=Path(sys.argv[3]), serf_binary=sys.argv[4], hostname="test")
    await node.start()
    print(node.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_serf_child_ends_with_a_killed_owner(serf_binary: str, tmp_path: Path) -> None:
    """A worker killed outright (SIGKILL, the OOM killer) must not leave its serf holding the gossip port."""
    import subprocess
    import sys
    import time

    from tools.procs import alive

    ip, port = free_address()
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, ip, str(port), str(tmp_path / "serf"), serf_binary],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    serf_pid = 0
    try:
        assert owner.stdout is not None
        serf_pid = int(owner.stdout.readline())
        assert alive(serf_pid)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 10  # a bound on correctness, not a timing
        while alive(serf_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(serf_pid), "the serf child outlived the process that started it"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if serf_pid and alive(serf_pid):
            os.kill(serf_pid, signal.SIGKILL)  # the child our test process's child started, by its PID
