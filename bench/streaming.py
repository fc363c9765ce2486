"""Scenario 2: streaming. `docker save` of a random-data image (GET /images/{name}/get) and `docker logs` of a
chatty container (GET /containers/{id}/logs), direct vs through the agent: MB/s, and the agent's RSS sampled
from /proc/<pid>/status every 20 ms during each transfer. The data sets are built before any timing.

Two clients read each stream, to /dev/null: the real Docker CLI (`docker save`, `docker logs`: Go's TLS, as
Portainer and the CLI are in real use; the primary figure), and our Python client (bench.loadgen), whose
own TLS decryption in asyncio costs about as much CPU as the agent's relay on this 2-core machine. HAProxy
and the asyncio relay move the same streams through TLS, as references."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from bench import loadgen
from bench.common import REFERENCES, RssSampler, Sizes, agent_memory_kib, log, median, ratio
from tools.dockerd import DOCKER_CLI


@dataclass
class Target:
    """One way to reach the engine: the socket (pid None) or an agent (its pid, sampled)."""

    url: str  # unix://SOCKET: or https://127.0.0.1:PORT
    pid: int | None = None
    cli: list[str] = field(default_factory=list)  # docker CLI arguments before the command
    env: dict[str, str] = field(default_factory=dict)


def _sampled(pid: int | None, fn: Any) -> tuple[Any, float, float]:
    if pid is None:
        return fn(), 0.0, 0.0
    with RssSampler(pid, measure=agent_memory_kib) as sampler:  # PSS over the agent's processes
        res = fn()
    return res, sampler.peak_mib, sampler.first_mib


def _python(target: Target, path: str, headers: dict[str, str]) -> dict[str, Any]:
    spec = {"mode": "stream", "url": target.url + path, "headers": {} if target.pid is None else headers}
    res, peak, first = _sampled(target.pid, lambda: loadgen.launch(spec, timeout=900))
    if res["status"] != 200 or not res["bytes"]:
        raise RuntimeError(f"stream {target.url + path}: HTTP {res['status']}, {res['bytes']} bytes")
    return {"mb_per_s": res["mb_per_s"], "bytes": res["bytes"], "rss_peak_mib": peak, "rss_start_mib": first}


def _cli(target: Target, command: list[str], wire_bytes: int) -> dict[str, Any]:
    """The Docker CLI with its output to /dev/null; MB/s of the bytes the API sent (wire_bytes)."""
    env = {**os.environ, **target.env}
    env.pop("DOCKER_HOST", None)

    def go() -> float:
        t0 = time.perf_counter()
        res = subprocess.run([DOCKER_CLI, *target.cli, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env, timeout=900, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"docker {' '.join(command)} via {target.url}: {res.stderr.decode()[-500:]}")
        return time.perf_counter() - t0

    seconds, peak, first = _sampled(target.pid, go)
    return {"mb_per_s": round(wire_bytes / 1e6 / seconds, 1), "bytes": wire_bytes, "rss_peak_mib": peak,
            "rss_start_mib": first}


def run(targets: dict[str, Target], headers: dict[str, str], image: str, container: str,
        sizes: Sizes) -> dict[str, Any]:
    """targets: `direct`, `agent` and optionally `agent_before` and the references (REFERENCES)."""
    cases = {
        "save": (f"/images/{image}/get", ["save", image]),
        "logs": (f"/containers/{container}/logs?stdout=1&stderr=1", ["logs", container]),
    }
    agent_pid = targets["agent"].pid
    out: dict[str, Any] = {"agent_rss_idle_mib": round(agent_memory_kib(agent_pid) / 1024, 1) if agent_pid else 0.0,
                           "clients": {"cli": "docker CLI (Go), output to /dev/null",
                                       "python": "bench.loadgen (aiohttp)"}}
    for case, (path, command) in cases.items():
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {"cli": {}, "python": {}}
        for rep in range(sizes.stream_reps):
            for name, target in targets.items():
                py = _python(target, path, headers)
                runs["python"].setdefault(name, []).append(py)
                runs["cli"].setdefault(name, []).append(_cli(target, command, py["bytes"]))
            log(f"streaming {case} rep {rep + 1}: " + "; ".join(
                f"{client} " + ", ".join(f"{n} {r[-1]['mb_per_s']:.0f} MB/s" for n, r in by_name.items())
                for client, by_name in runs.items())
                + f" (agent RSS peak {runs['cli']['agent'][-1]['rss_peak_mib']} MiB)")
        row: dict[str, Any] = {}
        for client, by_name in runs.items():
            for name, rs in by_name.items():
                key = name if client == "cli" else f"{name}_python"
                row[key] = {"mb_per_s": median([r["mb_per_s"] for r in rs]), "bytes": rs[0]["bytes"],
                            "runs_mb_per_s": [r["mb_per_s"] for r in rs]}
                if targets[name].pid is not None:
                    row[key]["rss_peak_mib"] = max(r["rss_peak_mib"] for r in rs)
                    row[key]["rss_start_mib"] = min(r["rss_start_mib"] for r in rs)
        row["mbps_agent/direct"] = ratio(row["agent"]["mb_per_s"], row["direct"]["mb_per_s"])
        row["mbps_agent/direct_python"] = ratio(row["agent_python"]["mb_per_s"], row["direct_python"]["mb_per_s"])
        for ref in REFERENCES:
            if ref in row:
                row[f"mbps_{ref}/direct"] = ratio(row[ref]["mb_per_s"], row["direct"]["mb_per_s"])
                row[f"mbps_{ref}/direct_python"] = ratio(row[f"{ref}_python"]["mb_per_s"],
                                                        row["direct_python"]["mb_per_s"])
        if "agent_before" in row:
            row["mbps_after/before"] = ratio(row["agent"]["mb_per_s"], row["agent_before"]["mb_per_s"])
            row["mbps_after/before_python"] = ratio(row["agent_python"]["mb_per_s"],
                                                    row["agent_before_python"]["mb_per_s"])
        out[case] = row
    return out
