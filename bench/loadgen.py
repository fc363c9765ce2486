"""Our asynchronous load generator (aiohttp), run as a child process so that it never shares a GIL with the
bench's samplers: `python -m bench.loadgen '<json spec>'` prints one JSON result line.

Modes (spec["mode"]):
- "load": closed loop of `concurrency` workers on one URL, bounded by `requests` and `seconds`, after an
  untimed warm-up that opens every connection (TLS handshakes included); p50/p99/requests per second.
- "stream": one GET read to its end in chunks; bytes, seconds, MB/s.
- "multi": `reps` rounds of GETs of several URLs at once (a client-side fan-out without any agent), each
  answer parsed as JSON; the time of each round.

A URL is either http(s)://host:port/path or unix:///path/to/socket:/path (the Docker socket, for "direct").
TLS is never verified (the agent and HAProxy use self-signed certificates).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import aiohttp

from bench.common import percentile


def _split(url: str) -> tuple[str | None, str]:
    """(unix socket path or None, http URL)."""
    if url.startswith("unix://"):
        sock, _, path = url[len("unix://"):].partition(":")
        return sock, "http://docker" + (path or "/")
    return None, url


def _insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _session(sock: str | None, limit: int) -> aiohttp.ClientSession:
    connector: aiohttp.BaseConnector
    if sock is not None:
        connector = aiohttp.UnixConnector(path=sock, limit=limit, keepalive_timeout=60)
    else:
        connector = aiohttp.TCPConnector(limit=limit, ssl=_insecure(), keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
                                 auto_decompress=False, skip_auto_headers=("User-Agent",))


async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    sock, url = _split(spec["url"])
    headers: dict[str, str] = spec.get("headers") or {}
    concurrency = int(spec.get("concurrency", 1))
    max_requests = int(spec.get("requests", 1000))
    max_seconds = float(spec.get("seconds", 10.0))
    warmup = int(spec.get("warmup", max(20, 2 * concurrency)))
    count_json = bool(spec.get("count_json", False))
    watch_header = spec.get("watch_header")
    latencies: list[float] = []
    started: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    lengths: list[int] = []
    header_values: list[str] = []
    nbytes = 0
    async with _session(sock, concurrency) as session:

        async def one(record: bool) -> None:
            nonlocal nbytes
            t0 = time.perf_counter()
            try:
                async with session.get(url, headers=headers) as resp:
                    body = await resp.read()
                    status = resp.status
                    seen = resp.headers.get(watch_header, "") if watch_header else ""
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if record:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            elapsed = time.perf_counter() - t0
            if not record:
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status >= 400:
                errors.append(f"HTTP {status}: {body[:200]!r}")
                return
            latencies.append(elapsed)
            started.append(t0)
            nbytes += len(body)
            if count_json:
                data = json.loads(body)
                lengths.append(len(data) if isinstance(data, list) else len(data.get("Volumes") or []))
            if watch_header:
                header_values.append(seen)

        # Warm-up: every connection of the pool opened and used once, untimed.
        for i in range(0, warmup, concurrency):
            await asyncio.gather(*(one(False) for _ in range(min(concurrency, warmup - i))))
        issued = 0
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                await one(True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    done = len(latencies)
    return {
        "requests": done,
        "errors": len(errors),
        "first_errors": errors[:3],
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "rps": round(done / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "mean_ms": round(sum(latencies) / done * 1000, 3) if done else 0.0,
        "bytes_per_response": round(nbytes / done) if done else 0,
        "latencies_ms": [round(x * 1000, 3) for x in latencies] if spec.get("keep_latencies") else [],
        "started_s": [round(x - start, 3) for x in started] if spec.get("keep_latencies") else [],
        "json_lengths": sorted(set(lengths)),
        "header_values": header_values if watch_header else [],
    }


async def run_stream(spec: dict[str, Any]) -> dict[str, Any]:
    sock, url = _split(spec["url"])
    headers: dict[str, str] = spec.get("headers") or {}
    chunk = int(spec.get("chunk", 2**18))
    async with _session(sock, 1) as session:
        t0 = time.perf_counter()
        total = 0
        async with session.get(url, headers=headers) as resp:
            status = resp.status
            async for data in resp.content.iter_chunked(chunk):
                total += len(data)
        elapsed = time.perf_counter() - t0
    return {"status": status, "bytes": total, "seconds": round(elapsed, 3),
            "mb_per_s": round(total / 1e6 / elapsed, 1) if elapsed > 0 else 0.0}


async def run_multi(spec: dict[str, Any]) -> dict[str, Any]:
    urls: list[str] = spec["urls"]
    headers: dict[str, str] = spec.get("headers") or {}
    reps = int(spec.get("reps", 5))
    parsed = [_split(u) for u in urls]
    sessions = [_session(sock, 4) for sock, _ in parsed]
    rounds: list[float] = []
    items = 0
    try:
        async def get(session: aiohttp.ClientSession, url: str) -> bytes:
            async with session.get(url, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status} from {url}: {body[:200]!r}")
            return body

        for rep in range(reps + 1):  # round 0 warms the connections up
            t0 = time.perf_counter()
            bodies = await asyncio.gather(*(get(s, u) for s, (_, u) in zip(sessions, parsed, strict=True)))
            if rep:
                rounds.append(time.perf_counter() - t0)
            items = sum(len(json.loads(b)) for b in bodies)  # untimed, as in "load"
    finally:
        for s in sessions:
            await s.close()
    return {"rounds_ms": [round(r * 1000, 3) for r in rounds], "p50_ms": round(percentile(rounds, 50) * 1000, 3),
            "items": items}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    mode = spec.get("mode", "load")
    runner = {"load": run_load, "stream": run_stream, "multi": run_multi}[mode]
    result = asyncio.run(runner(spec))
    print(json.dumps(result))
    return 0


def launch(spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run one spec in a child process (`python -m bench.loadgen`) and return its result."""
    from bench.common import PY, run_json

    result: dict[str, Any] = run_json([PY, "-m", "bench.loadgen", json.dumps(spec)], timeout=timeout)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
