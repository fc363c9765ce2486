"""PNG plots of one run's results (matplotlib, no display)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import CHECKED, RELAY

COLORS = {"direct": "#4c72b0", "agent": "#dd8452", "haproxy": "#55a868", "agent_before": "#c44e52",
          RELAY: "#8172b3", CHECKED: "#937860"}


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=COLORS.get(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def overhead(result: dict[str, Any], path: Path) -> None:
    table = result["table"]
    groups = list(table)
    names = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    c1 = [g for g in groups if g.endswith("c=1")]
    c64 = [g for g in groups if g.endswith("c=64")]
    _bars(axes[0], c1, {n: [table[g][n]["p50_ms"] for g in c1] for n in names}, "ms", "p50 latency, concurrency 1")
    _bars(axes[1], c64, {n: [table[g][n]["p99_ms"] for g in c64] for n in names}, "ms",
          "p99 latency, concurrency 64")
    _bars(axes[2], c64, {n: [table[g][n]["rps"] for g in c64] for n in names}, "requests/s (log scale)",
          "throughput, concurrency 64")
    axes[2].set_yscale("log")
    fig.suptitle("Per-request overhead: Docker socket direct vs agent (TLS, signed) vs HAProxy (TLS) vs asyncio relay "
                 "(TLS, bytes only) vs the relay with the agent's checks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def streaming(result: dict[str, Any], path: Path) -> None:
    cases: list[str] = [c for c in ("save", "logs") if c in result]
    names = [n for n in result[cases[0]] if isinstance(result[cases[0]][n], dict)]
    groups = [f"{c} ({client})" for c in cases for client in ("docker CLI", "Python client")]
    bases = [n for n in names if not n.endswith("_python")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(axes[0], groups, {n: [result[c][n + sfx]["mb_per_s"] for c in cases for sfx in ("", "_python")]
                            for n in bases}, "MB/s", "throughput")
    servers = [n for n in bases if n != "direct"]
    peaks = {n: [max(result[c][n + sfx]["rss_peak_mib"] for sfx in ("", "_python")) for c in cases] for n in servers}
    _bars(axes[1], cases, peaks, "MiB", "peak memory during the transfer, either client (PSS of the process tree)")
    axes[1].set_ylim(0, 125)
    axes[1].legend(fontsize=8, loc="upper right", ncol=len(servers))  # above the bars and the target line
    axes[1].axhline(100, color="grey", ls="--", lw=1)
    axes[1].text(0, 101, "target 100 MiB", fontsize=8, color="grey")
    fig.suptitle("Streaming: docker save / docker logs, direct vs through the agent, HAProxy and the asyncio relay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fanout(result: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{n} alone" for n in result["direct_alone_p50_ms"]] + ["all engines at once", "agent fan-out"]
    values = [*result["direct_alone_p50_ms"].values(), result["direct_all_at_once_p50_ms"], result["agent_p50_ms"]]
    colors = [COLORS["direct"]] * (len(values) - 1) + [COLORS["agent"]]
    axes[0].bar(range(len(values)), values, color=colors)
    axes[0].set_xticks(range(len(values)))
    axes[0].set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axes[0].set_ylabel("p50 ms")
    axes[0].set_title(f"GET /containers/json?all=1, {result['nodes']} nodes x {result['containers_per_node']}",
                      fontsize=10)
    black = result.get("blackhole")
    if black:
        xs = [a["after_s"] for a in black["answers"]]
        ys = [a["ms"] for a in black["answers"]]
        axes[1].plot(xs, ys, "o-", color=COLORS["agent"], label="answer time")
        axes[1].axhline(result["fanout_timeout_s"] * 1000, color="red", ls="--", lw=1, label="per-node deadline")
        axes[1].set_xlabel(f"seconds since {black['node']} was blackholed")
        axes[1].set_ylabel("ms")
        axes[1].set_title("one node blackholed", fontsize=10)
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sim(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    nodes = [r["nodes"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].plot(nodes, [r["fanout_p50_ms"] for r in rows], "o-", color=COLORS["agent"], label="agent fan-out p50")
    axes[0].plot(nodes, [r["direct_all_engines_p50_ms"] for r in rows], "s--", color=COLORS["direct"],
                 label="client fetching every stand-in directly")
    if result.get("before_rows"):
        axes[0].plot(nodes, [r["fanout_p50_ms"] for r in result["before_rows"]], "^:", color=COLORS["agent_before"],
                     label="agent fan-out p50 (before)")
    axes[0].set_xlabel("simulated nodes")
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"fan-out latency ({result['containers_per_node']} containers per node, one process)",
                      fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(nodes, [r["process_rss_idle_mib"] for r in rows], "o-", label="idle RSS (all agents)")
    axes[1].plot(nodes, [r["process_rss_peak_mib"] for r in rows], "s-", label="peak RSS during fan-outs")
    axes[1].set_xlabel("simulated nodes")
    axes[1].set_ylabel("MiB")
    axes[1].set_title("memory of the simulation process", fontsize=10)
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def all_plots(results: dict[str, Any], outdir: Path) -> list[str]:
    made = []
    for key, fn, name in (("overhead", overhead, "overhead.png"), ("streaming", streaming, "streaming.png"),
                          ("fanout", fanout, "fanout.png"), ("sim", sim, "sim_scale.png")):
        data = results.get(key)
        if isinstance(data, dict) and "error" not in data:
            fn(data, outdir / name)
            made.append(name)
    return made


if __name__ == "__main__":
    # `python -m bench.plots DIR`: draw the plots of DIR/latest.json again (e.g. after changing this file).
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    print(all_plots(json.loads((folder / "latest.json").read_text()), folder))
