"""Smoke test of the benchmark suite: the quick mode's cheapest scenario (the in-process simulation: no dockerd,
no namespaces) end to end, through `python -m bench` as `./dev.sh bench` runs it. No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_quick_simulation_writes_results(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "sim", "--results", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    assert {"meta", "timings", "sim", "targets", "plots"} <= data.keys()
    assert data["meta"]["quick"] is True
    sim = data["sim"]
    assert "error" not in sim, sim
    rows = sim["rows"]
    assert [r["nodes"] for r in rows] == data["meta"]["sizes"]["sim_nodes"]
    for row in rows:
        assert row["items"] == row["nodes"] * sim["containers_per_node"]
        for key in ("fanout_p50_ms", "fanout_p99_ms", "fanout_per_node_ms", "direct_all_engines_p50_ms",
                    "p50_fanout/direct_all", "process_rss_idle_mib", "process_rss_peak_mib", "response_bytes"):
            assert row[key] > 0, (key, row)
    assert sim["node_ratio"] > 1
    assert data["plots"] == ["sim_scale.png"]
    assert (tmp_path / "sim_scale.png").stat().st_size > 1000
    assert (tmp_path / "summary.md").read_text().startswith("Run of ")
