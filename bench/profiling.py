"""Scenario 6: where the agent spends its CPU. py-spy samples a running agent (by PID, from outside) while a
load runs, and the collapsed stacks are summed up by function (self and inclusive) and by area."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import REPO, log

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Leaf-frame file patterns -> area, first match wins.
AREAS = (
    ("tls (asyncio sslproto, ssl)", ("asyncio/sslproto.py", "/ssl.py", "agent/tlsproto.py")),
    ("json", ("/json/", "orjson")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("aiohttp server", ("aiohttp/web", "aiohttp/http_writer", "aiohttp/base_protocol", "aiohttp/_http_parser",
                        "aiohttp/http_parser", "aiohttp/streams")),
    ("aiohttp client", ("aiohttp/client", "aiohttp/connector", "aiohttp/helpers", "aiohttp/tracing",
                        "aiohttp/cookiejar", "yarl", "aiohttp/http_")),
    ("headers (multidict)", ("multidict",)),
    ("asyncio loop", ("asyncio/",)),
    ("keelson agent/", ("agent/",)),
    ("keelson proxy/", ("proxy/",)),
)


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, num = line.rpartition(" ")
        if not stack or not num.isdigit():
            continue
        n = int(num)
        total += n
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part.strip())
            if m is None:
                continue
            frames.append(f"{m.group('func')} ({_short(m.group('file'))})")
        if not frames:
            continue
        leaf = frames[-1]
        self_counts[leaf] += n
        for f in set(frames):
            incl_counts[f] += n
        leaf_file = leaf[leaf.rfind("(") + 1:]
        for area, patterns in AREAS:
            if any(p in leaf_file for p in patterns):
                areas[area] += n
                break
        else:
            areas["other"] += n

    def pct(c: Counter[str], keep: int, only_ours: bool = False) -> list[tuple[str, float]]:
        items = [(k, v) for k, v in c.most_common() if not only_ours or "(agent/" in k or "(proxy/" in k]
        return [(k, round(100 * v / total, 1)) for k, v in items[:keep]] if total else []

    return {
        "samples": total,
        "areas_pct": dict(pct(areas, 20)),
        "top_self_pct": pct(self_counts, top),
        "top_keelson_inclusive_pct": pct(incl_counts, top, only_ours=True),
    }


def profile(pid: int, spec: dict[str, Any], seconds: float, out: Path) -> dict[str, Any]:
    """Record `pid` with py-spy for `seconds` while `spec` (a bench.loadgen spec) runs; the raw stacks go to
    `out`, the summary is returned."""
    binary = shutil.which("py-spy") or str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy")
    if not Path(binary).exists():
        return {"skipped": "py-spy is missing (pip install -e '.[dev]')"}
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(loadgen.launch(spec, timeout=seconds * 4 + 120))

    loader = threading.Thread(target=load)
    loader.start()
    # --subprocesses: the supervisor only waits; its forked workers do the work
    rec = subprocess.run([binary, "record", "--pid", str(pid), "--subprocesses",
                          "--duration", str(max(1, int(seconds))),
                          "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out)],
                         capture_output=True, text=True, timeout=seconds + 120, check=False)
    loader.join()
    if rec.returncode != 0 or not out.exists():
        return {"skipped": f"py-spy failed: {rec.stderr.strip()[-500:]}"}
    summary = summarize(out.read_text())
    summary["load"] = {k: result[k] for k in ("rps", "p50_ms", "requests", "status", "bytes", "seconds", "mb_per_s")
                       if k in result}
    summary["raw"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    log(f"profile {spec['url'].rsplit('/', 1)[-1]}: {summary['samples']} samples; areas {summary['areas_pct']}")
    return summary
