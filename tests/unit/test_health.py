"""PeerHealth: a node that failed is skipped at once until a probe answers (no sockets: the probe is a list)."""

from __future__ import annotations

import asyncio

from proxy.health import PeerHealth


async def test_a_failed_node_is_skipped_until_its_probe_answers() -> None:
    answers = [False, False, True]
    probed: list[tuple[str, int]] = []

    async def probe(ip: str, port: int) -> bool:
        probed.append((ip, port))
        return answers.pop(0)

    health = PeerHealth(probe, first_backoff=0.01, max_backoff=0.02)
    assert health.skipped("n2") is None
    health.failed("n2", "10.0.0.2", 9001, "unreachable: refused")
    reason = health.skipped("n2")
    assert reason is not None and reason.startswith("skipped: unreachable: refused")
    for _ in range(200):
        if health.skipped("n2") is None:
            break
        await asyncio.sleep(0.01)
    assert health.skipped("n2") is None and probed == [("10.0.0.2", 9001)] * 3


async def test_an_answer_clears_and_departed_nodes_are_forgotten() -> None:
    async def never(ip: str, port: int) -> bool:
        return False

    health = PeerHealth(never, first_backoff=10)
    health.failed("n2", "10.0.0.2", 9001, "x")
    health.failed("n3", "10.0.0.3", 9001, "x")
    health.answered("n2")
    health.forget({"n1"})
    assert health.skipped("n2") is None and health.skipped("n3") is None
