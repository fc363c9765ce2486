"""The benchmark report: targets met or missed from a run's ratios, with the references' same ratios beside them."""

from __future__ import annotations

from typing import Any

from bench.common import CHECKED, RELAY
from bench.report import CONTAINERS, markdown, targets


def _run() -> dict[str, Any]:
    def row(**by_name: tuple[float, float]) -> dict[str, Any]:
        return {name: {"p50_ms": p50, "rps": rps} for name, (p50, rps) in by_name.items()}

    table = {f"{CONTAINERS} c=1": row(direct=(4.0, 200), agent=(5.0, 160), haproxy=(4.4, 180), **{RELAY: (4.2, 190)}),
             "/_ping c=64": row(direct=(6.0, 9000), agent=(15.0, 4000), haproxy=(8.0, 8000),
                                **{RELAY: (9.0, 6000), CHECKED: (10.0, 4800)})}
    return {
        "overhead": {
            "table": table,
            "ratios": {f"{CONTAINERS} c=1": {"p50_agent/direct": 1.25}, "/_ping c=64": {"rps_agent/haproxy": 0.5}},
            "hey_ratios": {"/_ping c=64": 0.8, f"/_ping c=64 {RELAY}/haproxy": 0.9,
                           f"/_ping c=64 {CHECKED}/haproxy": 0.7},
        },
        "streaming": {"save": {"mbps_agent/direct": 0.85, "mbps_haproxy/direct": 0.8,
                               f"mbps_{RELAY}/direct": 0.88, "mbps_agent/direct_python": 0.95,
                               "agent": {"rss_peak_mib": 90.0}, "agent_python": {"rss_peak_mib": 91.0}}},
    }


def test_targets_carry_the_references_ratios_of_the_same_run() -> None:
    got = targets(_run())
    p50 = got["p50 agent/direct, /containers/json c=1"]
    assert (p50["value"], p50["met"]) == (1.25, False)
    assert p50["references"] == {"haproxy": 1.1, RELAY: 1.05}  # 4.4/4.0 and 4.2/4.0, from the same table
    ping = got["req/s agent/haproxy, /_ping c=64 (bench.loadgen)"]
    assert (ping["value"], ping["met"], ping["references"]) == (0.5, False, {RELAY: 0.75, CHECKED: 0.6})
    ping_hey = got["req/s agent/haproxy, /_ping c=64 (hey)"]
    assert (ping_hey["met"], ping_hey["references"]) == (True, {RELAY: 0.9, CHECKED: 0.7})
    save = got["MB/s agent/direct, save (docker CLI)"]
    assert (save["met"], save["references"]) == (False, {"haproxy": 0.8, RELAY: 0.88})
    assert got["MB/s agent/direct, save (Python client)"]["references"] == {}  # no reference measured it
    assert got["agent peak RSS MiB, save"]["value"] == 91.0
    assert "req/s agent/haproxy, /version c=64 (hey)" not in got  # not measured: no entry, not a miss


def test_the_summary_shows_each_target_with_its_references() -> None:
    text = markdown({"targets": targets(_run())})
    assert "| MB/s agent/direct, save (docker CLI) | 0.85 | >= 0.9 | **no** | haproxy 0.8, asyncio_relay 0.88 |" in text
    assert ("| req/s agent/haproxy, /_ping c=64 (hey) | 0.8 | >= 0.75 | yes | asyncio_relay 0.9, checked_relay 0.7 |"
            in text)
