"""Scenario 1: per-request overhead. GET /_ping, /version and /containers/json at concurrency 1 and 64,
direct to the Docker socket vs through the agent (TLS, signed) vs through HAProxy (TLS) on the same socket.

Every target is driven by the same client (bench.loadgen, a child process); at concurrency 64 the TCP targets
are also driven by Debian's hey (Go), whose client costs less CPU on this 2-core machine."""

from __future__ import annotations

import statistics
from typing import Any

from bench import loadgen
from bench.common import RELAYS, Sizes, log, ratio
from bench.external import hey
from tools.procs import tree_cpu_seconds

PATHS = ("/_ping", "/version", "/containers/json?all=1")
CONCURRENCY = (1, 64)


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs, the one with the most requests/s (the least disturbed by the shared CPU)."""
    ok = [r for r in runs if r.get("requests")]
    return max(ok, key=lambda r: r["rps"]) if ok else runs[0]


def run(targets: dict[str, str], headers: dict[str, str], sizes: Sizes, rounds: int = 2,
        with_hey: bool = True, pids: dict[str, int] | None = None) -> dict[str, Any]:
    """targets: name -> base URL (unix://SOCKET: or https://host:port). Names `direct`, `agent`, `haproxy`
    get the ratios; any other (e.g. `agent_before`) is measured the same way. `pids` (name -> PID of a
    server's main process): with hey, the CPU its process tree spends per request, a figure that does not
    depend on how busy the machine is."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for path in PATHS:
        for conc in CONCURRENCY:
            key = f"{path} c={conc}"
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for rnd in range(rounds):
                # Interleaved, so that a burst of load from elsewhere hits every target alike.
                for name, base in targets.items():
                    spec = {
                        "mode": "load", "url": base + path, "headers": {} if name == "direct" else headers,
                        "concurrency": conc,
                        "requests": sizes.requests_c1 if conc == 1 else sizes.requests_c64,
                        "seconds": sizes.seconds, "warmup": 20 if conc == 1 else 2 * conc,
                    }
                    res = loadgen.launch(spec, timeout=sizes.seconds * 4 + 120)
                    if res["errors"]:
                        raise RuntimeError(f"{name} {key}: {res['errors']} errors, e.g. {res['first_errors']}")
                    runs[name].append(res)
                    log(f"overhead {key:<22} {name:<13} round {rnd + 1}: p50 {res['p50_ms']:.3f} ms, "
                        f"p99 {res['p99_ms']:.3f} ms, {res['rps']:.0f} req/s")
            row = {}
            for name in targets:
                best = _best(runs[name])
                row[name] = {k: best[k] for k in ("p50_ms", "p99_ms", "rps", "requests", "bytes_per_response")}
                row[name]["rounds_rps"] = [r["rps"] for r in runs[name]]
            table[key] = row
    ratios: dict[str, dict[str, float]] = {}
    for key, row in table.items():
        r: dict[str, float] = {}
        for other in ("direct", "haproxy"):
            if "agent" in row and other in row:
                r[f"p50_agent/{other}"] = ratio(row["agent"]["p50_ms"], row[other]["p50_ms"])
                r[f"p99_agent/{other}"] = ratio(row["agent"]["p99_ms"], row[other]["p99_ms"])
                r[f"rps_agent/{other}"] = ratio(row["agent"]["rps"], row[other]["rps"])
        if "agent_before" in row and "agent" in row:
            r["p50_after/before"] = ratio(row["agent"]["p50_ms"], row["agent_before"]["p50_ms"])
            r["rps_after/before"] = ratio(row["agent"]["rps"], row["agent_before"]["rps"])
        ratios[key] = r
    out: dict[str, Any] = {"table": table, "ratios": ratios, "rounds": rounds,
                           "client": "bench.loadgen (aiohttp, keep-alive, one child process)"}
    if with_hey:
        hey_table: dict[str, dict[str, Any]] = {}
        hey_ratios: dict[str, float] = {}
        cpu_ratios: dict[str, float] = {}
        for path in PATHS:
            row = {}
            for name, base in targets.items():
                if not base.startswith("https://"):
                    continue
                # As many requests as our client managed in its time bound, so hey stays within it too.
                rate = table[f"{path} c=64"].get(name, {}).get("rps", 0.0)
                count = max(256, min(sizes.requests_c64, int(rate * sizes.seconds)))
                pid = (pids or {}).get(name)
                cpu0 = tree_cpu_seconds(pid) if pid else 0.0
                res = hey(base + path, headers, 64, count, timeout=sizes.seconds * 6 + 60)
                answered = sum(res.get("statuses", {}).values())
                if pid and answered:
                    res["cpu_us_per_request"] = round((tree_cpu_seconds(pid) - cpu0) / answered * 1e6, 1)
                row[name] = res
                log(f"overhead hey {path:<22} c=64 {name:<13}: {res.get('rps', 0):.0f} req/s, "
                    f"p50 {res.get('p50_ms', 0)} ms")
            key = f"{path} c=64"
            hey_table[key] = row
            for ref in RELAYS:
                if ref in row and "haproxy" in row:
                    hey_ratios[f"{key} {ref}/haproxy"] = ratio(row[ref].get("rps", 0), row["haproxy"].get("rps", 0))
            if "agent" in row and "haproxy" in row:
                hey_ratios[key] = ratio(row["agent"].get("rps", 0), row["haproxy"].get("rps", 0))
                if row["agent"].get("cpu_us_per_request") and row["haproxy"].get("cpu_us_per_request"):
                    cpu_ratios[key] = ratio(row["agent"]["cpu_us_per_request"], row["haproxy"]["cpu_us_per_request"])
        out["hey"] = hey_table
        out["hey_ratios"] = hey_ratios
        out["cpu_ratios"] = cpu_ratios
        if pids:
            out["fixed_rate"] = fixed_rate_cpu(targets, headers, sizes, pids, rounds)
    return out


FIXED_RATES = {"/_ping": 1600.0, "/version": 100.0, "/containers/json?all=1": 100.0}
"""Requests per second for the fixed-rate runs: below what every TLS target sustains on 2 shared cores."""


def fixed_rate_cpu(targets: dict[str, str], headers: dict[str, str], sizes: Sizes, pids: dict[str, int],
                   rounds: int) -> dict[str, Any]:
    """CPU per request of each TLS target's process tree with hey sending at a fixed rate, interleaved, the
    median of `rounds`. At full load (concurrency 64) a server that gets less of the shared CPU handles more
    requests per loop iteration and so spends less per request: a slower server can look cheaper. At the same
    rate, below saturation, every server does the same work per second, and the figure compares code."""
    table: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    names = [n for n, base in targets.items() if base.startswith("https://") and pids.get(n)]
    for path, rate in FIXED_RATES.items():
        runs: dict[str, list[float]] = {}
        held: dict[str, list[float]] = {}
        count = max(64, int(rate * sizes.seconds))
        for rnd in range(rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                pid = pids[name]
                cpu0 = tree_cpu_seconds(pid)
                res = hey(targets[name] + path, headers, 32, count, timeout=sizes.seconds * 6 + 60, rate=rate)
                answered = sum(res.get("statuses", {}).values())
                if not answered:
                    continue
                runs.setdefault(name, []).append((tree_cpu_seconds(pid) - cpu0) / answered * 1e6)
                held.setdefault(name, []).append(res.get("rps", 0.0))
        row: dict[str, dict[str, Any]] = {
            name: {"cpu_us_per_request": round(statistics.median(v), 1), "rounds_cpu_us": [round(x, 1) for x in v],
                   "rps": round(statistics.median(held[name]))}
            for name, v in runs.items()
        }
        for name, cell in row.items():
            log(f"overhead fixed rate {path:<22} {rate:.0f}/s {name:<13}: {cell['cpu_us_per_request']} us/request "
                f"(rounds {cell['rounds_cpu_us']}), {cell['rps']} req/s held")
        key = f"{path} at {rate:.0f}/s"
        table[key] = row
        if "agent" in row and "haproxy" in row:
            ratios[f"{key} agent/haproxy"] = ratio(row["agent"]["cpu_us_per_request"],
                                                   row["haproxy"]["cpu_us_per_request"])
        for ref in RELAYS:
            if "agent" in row and ref in row:
                ratios[f"{key} agent/{ref}"] = ratio(row["agent"]["cpu_us_per_request"],
                                                     row[ref]["cpu_us_per_request"])
            if ref in row and "haproxy" in row:
                ratios[f"{key} {ref}/haproxy"] = ratio(row[ref]["cpu_us_per_request"],
                                                       row["haproxy"]["cpu_us_per_request"])
        if "agent" in row and "agent_before" in row:
            ratios[f"{key} after/before"] = ratio(row["agent"]["cpu_us_per_request"],
                                                  row["agent_before"]["cpu_us_per_request"])
    return {"table": table, "ratios": ratios, "connections": 32, "rounds": rounds}
