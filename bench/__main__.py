"""`python -m bench` (run by `./dev.sh bench`): Keelson's benchmark suite.

    python -m bench [--quick] [--only overhead,streaming,startup,profile,sim,fanout,recovery] [--results DIR]
                    [--compare-tree DIR]

Scenarios: overhead (per-request, direct vs agent vs HAProxy), streaming (docker save / logs),
fanout (real namespace Swarm), recovery (time to recover from each cluster fault, 5 nodes / 3 managers),
sim (50-200 simulated agents in one process), startup (start-up time, idle
RSS), profile (py-spy on the agent under load). Every figure that matters is a ratio of two things measured
in this same run. Results: DIR/latest.json, DIR/summary.md and PNG plots in DIR (default bench/results, or
bench/results/quick with --quick). --compare-tree runs a second agent from another source tree (the code
before a change) beside the current one, for same-run before/after ratios.

Everything made (dockerd, namespaces, agents, HAProxy, simulation processes) is removed at the end, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.common import CHECKED, RELAY, REPO, RESULTS, Sizes, log, timed
from tools.signer import Signer

SCENARIOS = ("overhead", "streaming", "startup", "profile", "sim", "fanout", "recovery")
ENGINE_SCENARIOS = {"overhead", "streaming", "startup", "profile"}
CHEAPEST = "sim"  # no dockerd, no root: what the smoke test runs


def _version(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (res.stdout or res.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _meta(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python -m bench " + " ".join(args.argv),
        "quick": sizes.quick,
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "git": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "haproxy": _version(["haproxy", "-v"]),
        "dockerd": _version(["dockerd", "--version"]),
        "sizes": {k: v for k, v in vars(sizes).items()},
        "compare_tree": str(args.compare_tree) if args.compare_tree else None,
    }


def _engine_scenarios(wanted: list[str], sizes: Sizes, results: dict[str, Any], signer: Signer,
                      outdir: Path, tree: Path | None, timings: dict[str, float]) -> None:
    from bench import overhead, profiling, startup, streaming
    from bench.engine import BenchAgent, chatty_container, create_containers, image_size, import_random_image
    from bench.external import AsyncioRelay, CheckedRelay, HAProxy
    from tools.dockerd import PrivateDockerd, new_run_id

    headers = signer.headers()
    run_id = new_run_id()
    root = Path(f"/tmp/kls-bench-{run_id}")
    engine = PrivateDockerd(root=root / "engine", netns=f"klsb{run_id}", hostname=f"klsb{run_id}")
    agent: BenchAgent | None = None
    before: BenchAgent | None = None
    haproxy: HAProxy | None = None
    relay: AsyncioRelay | None = None
    checked: CheckedRelay | None = None
    try:
        with timed(timings, "engine_setup_s"):
            engine.start()
            engine.import_busybox()
            create_containers(str(engine.socket), sizes.containers)
        # One signer for every agent and client: an agent pins the first key that signs.
        agent = BenchAgent(engine.host, root / "agent", signer=signer).start()
        if tree is not None:
            before = BenchAgent(engine.host, root / "agent-before", tree=tree, signer=signer).start()
        direct = f"unix://{engine.socket}:"
        if "overhead" in wanted:
            try:
                haproxy = HAProxy(root / "haproxy", str(engine.socket)).start()
                relay = AsyncioRelay(root / "relay", str(engine.socket)).start()
                checked = CheckedRelay(root / "checked-relay", str(engine.socket)).start()
                targets = {"direct": direct, "agent": agent.url, "haproxy": haproxy.url, RELAY: relay.url,
                           CHECKED: checked.url}
                pids = {"agent": agent.pid, "haproxy": haproxy.pid, RELAY: relay.pid, CHECKED: checked.pid}
                if before is not None:
                    targets["agent_before"] = before.url
                    pids["agent_before"] = before.pid
                with timed(timings, "overhead_s"):
                    results["overhead"] = overhead.run(targets, headers, sizes, rounds=1 if sizes.quick else 3,
                                                       pids=pids)
            except Exception as exc:
                results["overhead"] = _failed("overhead", exc)
            finally:
                for reference in (haproxy, relay, checked):
                    if reference is not None:
                        reference.stop()
        image = "keelson-bench-random:latest"
        cid = ""
        if "streaming" in wanted or "profile" in wanted:
            with timed(timings, "streaming_setup_s"):
                import_random_image(str(engine.socket), image, sizes.image_mib)
                cid = chatty_container(engine.host, sizes.logs_mib)
            log(f"streaming: image of {image_size(engine.host, image) / 2**20:.0f} MiB and a container with "
                f"{sizes.logs_mib} MiB of logs ready in {timings['streaming_setup_s']} s")
        if "streaming" in wanted:
            try:
                haproxy = HAProxy(root / "haproxy-streaming", str(engine.socket)).start()
                relay = AsyncioRelay(root / "relay-streaming", str(engine.socket)).start()
                stream_targets = {"direct": streaming.Target(direct, None, ["-H", engine.host]),
                                  "agent": streaming.Target(agent.url, agent.pid, *agent.cli_args()),
                                  "haproxy": streaming.Target(haproxy.url, haproxy.pid, *haproxy.cli_args()),
                                  RELAY: streaming.Target(relay.url, relay.pid, *relay.cli_args())}
                if before is not None:
                    stream_targets["agent_before"] = streaming.Target(before.url, before.pid, *before.cli_args())
                with timed(timings, "streaming_s"):
                    results["streaming"] = streaming.run(stream_targets, headers, image, cid, sizes)
            except Exception as exc:
                results["streaming"] = _failed("streaming", exc)
            finally:
                for reference in (haproxy, relay):
                    if reference is not None:
                        reference.stop()
        if "profile" in wanted:
            try:
                with timed(timings, "profile_s"):
                    prof: dict[str, Any] = {}
                    for name, path, conc in (("agent_containers_c64", "/containers/json?all=1", 64),
                                             ("agent_ping_c64", "/_ping", 64)):
                        spec = {"mode": "load", "url": agent.url + path, "headers": headers, "concurrency": conc,
                                "requests": 10**6, "seconds": sizes.profile_seconds + 2}
                        prof[name] = profiling.profile(agent.pid, spec, sizes.profile_seconds,
                                                       outdir / "profile" / f"{name}.txt")
                    for name, path in (("agent_save_stream", f"/images/{image}/get"),
                                       ("agent_logs_stream", f"/containers/{cid}/logs?stdout=1&stderr=1")):
                        spec = {"mode": "stream", "url": agent.url + path, "headers": headers}
                        prof[name] = profiling.profile(agent.pid, spec, sizes.profile_seconds,
                                                       outdir / "profile" / f"{name}.txt")
                    results["profile"] = prof
            except Exception as exc:
                results["profile"] = _failed("profile", exc)
        if "startup" in wanted:
            try:
                with timed(timings, "startup_s"):
                    results["startup"] = startup.run(engine.host, str(engine.socket), root / "startup", sizes, tree)
            except Exception as exc:
                results["startup"] = _failed("startup", exc)
    finally:
        for proc in (agent, before):
            if proc is not None:
                proc.stop()
        with timed(timings, "engine_teardown_s"):
            engine.stop()
        shutil.rmtree(root, ignore_errors=True)


def _failed(name: str, exc: BaseException) -> dict[str, Any]:
    log(f"{name} FAILED: {exc}")
    traceback.print_exc()
    return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--results", type=Path, default=None, help="output folder (default bench/results)")
    parser.add_argument("--compare-tree", type=Path, default=None,
                        help="a copy of the source tree (agent/, proxy/, ...) to measure beside the current one")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    needs_root = [s for s in wanted if s in ENGINE_SCENARIOS or s in ("fanout", "recovery")]
    if needs_root and os.geteuid() != 0:
        parser.error(f"{needs_root} need root (private dockerd, network namespaces); run ./dev.sh bench")
    sizes = Sizes.small() if args.quick else Sizes()
    outdir: Path = (args.results or (RESULTS / "quick" if args.quick else RESULTS)).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    tree = args.compare_tree.resolve() if args.compare_tree else None

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signer = Signer()
    headers = signer.headers()
    started = time.monotonic()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"meta": _meta(args, sizes), "timings": timings}
    log(f"scenarios {wanted}{' (quick)' if sizes.quick else ''}; results in {outdir}")
    try:
        if ENGINE_SCENARIOS & set(wanted):
            _engine_scenarios(wanted, sizes, results, signer, outdir, tree, timings)
        if "sim" in wanted:
            from bench import sim

            try:
                with timed(timings, "sim_s"):
                    results["sim"] = sim.run(sizes, headers, tree)
                if "profile" in wanted:
                    from bench import profiling

                    nodes = sizes.sim_nodes[min(1, len(sizes.sim_nodes) - 1)]
                    with sim.cluster(nodes, sizes.sim_containers) as ready:
                        spec = sim.fanout_spec(ready["entry"], headers, 10**6)
                        spec["seconds"] = sizes.profile_seconds + 2
                        results.setdefault("profile", {})[f"sim_fanout_{nodes}_nodes"] = profiling.profile(
                            ready["pid"], spec, sizes.profile_seconds, outdir / "profile" / f"sim_fanout_{nodes}.txt")
            except Exception as exc:
                results["sim"] = _failed("sim", exc)
        if "fanout" in wanted:
            from bench import swarmfan

            try:
                with timed(timings, "fanout_s"):
                    prof_out = outdir / "profile" / "swarm_fanout_entry.txt" if "profile" in wanted else None
                    results["fanout"] = swarmfan.run(Path(f"/tmp/kls-bench-swarm-{os.getpid()}"), sizes, timings,
                                                     prof_out)
                if isinstance(results["fanout"].get("entry_agent_profile"), dict):
                    results.setdefault("profile", {})["swarm_fanout_entry_agent"] = results["fanout"].pop(
                        "entry_agent_profile")
            except Exception as exc:
                results["fanout"] = _failed("fanout", exc)
        if "recovery" in wanted:
            from bench import recovery

            try:
                with timed(timings, "recovery_s"):
                    results["recovery"] = recovery.run(Path(f"/tmp/kls-bench-recovery-{os.getpid()}"))
            except Exception as exc:
                results["recovery"] = _failed("recovery", exc)
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped; partial results written")
        results["interrupted"] = True
    results["targets"] = report.targets(results)
    results["before_after"] = report.before_after(results)
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["plots"] = plots.all_plots(results, outdir)
    (outdir / "latest.json").write_text(json.dumps(results, indent=1))
    (outdir / "summary.md").write_text(report.markdown(results))
    log(f"done in {results['meta']['seconds']} s: {outdir / 'latest.json'}, summary.md, {results['plots']}")
    for name, t in results["targets"].items():
        same = "".join(f", {k} {v}" for k, v in t.get("references", {}).items())
        log(f"  target {name}: {t['value']} ({t['target']}) {'met' if t['met'] else 'MISSED'}"
            + (f" (references{same})" if same else ""))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed or results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
