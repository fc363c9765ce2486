"""The benchmark targets checked against one run's ratios, and a markdown summary of that run."""

from __future__ import annotations

from typing import Any

from bench.common import CHECKED, REFERENCES, RELAY, RELAYS, REQUEST_REFERENCES, ratio

CONTAINERS = "/containers/json?all=1"


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _table_ratio(ov: dict[str, Any], group: str, name: str, base: str, key: str) -> float:
    """One overhead table figure of `name` over the same of `base` (0.0, left out, when either is missing)."""
    return ratio(_get(ov, "table", group, name, key) or 0.0, _get(ov, "table", group, base, key) or 0.0)


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {value, target, met, references}; a scenario that did not run gives no entry. `references`
    holds the same ratio for the reference servers of the same run (HAProxy, the asyncio relay), where one
    exists: what a proxy without the agent's work reaches on this machine."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: Any, op: str, bound: float, refs: dict[str, Any] | None = None) -> None:
        if value is None or value == 0:
            return
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {"value": value, "target": f"{op} {bound}", "met": bool(met),
                     "references": {k: v for k, v in (refs or {}).items() if v}}

    ov = results.get("overhead") or {}
    group = f"{CONTAINERS} c=1"
    add("p50 agent/direct, /containers/json c=1", _get(ov, "ratios", group, "p50_agent/direct"), "<=", 1.15,
        {ref: _table_ratio(ov, group, ref, "direct", "p50_ms") for ref in REQUEST_REFERENCES})
    # /_ping is the agent's whole per-request cost against HAProxy's (the engine answers in no time): 0.75x;
    # where the engine does work, the agent must keep up with HAProxy.
    for path, bound in (("/_ping", 0.75), ("/version", 1.0), (CONTAINERS, 1.0)):
        group = f"{path} c=64"
        add(f"req/s agent/haproxy, {path} c=64 (bench.loadgen)", _get(ov, "ratios", group, "rps_agent/haproxy"),
            ">=", bound, {ref: _table_ratio(ov, group, ref, "haproxy", "rps") for ref in RELAYS})
        add(f"req/s agent/haproxy, {path} c=64 (hey)", _get(ov, "hey_ratios", group), ">=", bound,
            {ref: _get(ov, "hey_ratios", f"{group} {ref}/haproxy") for ref in RELAYS})
    st = results.get("streaming") or {}
    for case in ("save", "logs"):
        add(f"MB/s agent/direct, {case} (docker CLI)", _get(st, case, "mbps_agent/direct"), ">=", 0.9,
            {ref: _get(st, case, f"mbps_{ref}/direct") for ref in REFERENCES})
        add(f"MB/s agent/direct, {case} (Python client)", _get(st, case, "mbps_agent/direct_python"), ">=", 0.9,
            {ref: _get(st, case, f"mbps_{ref}/direct_python") for ref in REFERENCES})
        add(f"agent peak RSS MiB, {case}", max(_get(st, case, "agent", "rss_peak_mib") or 0,
                                                _get(st, case, "agent_python", "rss_peak_mib") or 0), "<=", 100)
    fo = results.get("fanout") or {}
    add("fan-out p50 agent/slowest node", _get(fo, "p50_agent/slowest_node"), "<=", 1.2)
    add("fan-out p50 agent/all engines at once", _get(fo, "p50_agent/direct_all_at_once"), "<=", 1.2)
    add("dead node: extra time/deadline", _get(fo, "blackhole", "extra/deadline"), "<=", 1.0)
    sm = results.get("sim") or {}
    for row in sm.get("entry_alone") or []:
        if row.get("nodes") == 200:
            add("entry agent peak RSS MiB, fan-out over 200 simulated nodes", row.get("entry_rss_peak_mib"),
                "<=", 100)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results.get("meta", {})
    lines.append(f"Run of {meta.get('started', '?')} (`{meta.get('command', '')}`), {meta.get('cpus')} CPUs, "
                 f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}, "
                 f"{meta.get('seconds')} s in all.")
    lines.append("")
    ov = results.get("overhead")
    if isinstance(ov, dict) and "table" in ov:
        names = list(next(iter(ov["table"].values())))
        lines.append("| request | " + " | ".join(f"{n} p50 / p99 ms, req/s" for n in names)
                     + " | agent/direct p50 | agent/haproxy p50 | agent/haproxy req/s |")
        lines.append("|---" * (len(names) + 4) + "|")
        for key, row in ov["table"].items():
            r = ov["ratios"].get(key, {})
            cells = [f"{row[n]['p50_ms']:.2f} / {row[n]['p99_ms']:.2f}, {row[n]['rps']:.0f}" for n in names]
            lines.append(f"| `GET {key}` | " + " | ".join(cells) + f" | {r.get('p50_agent/direct')} | "
                         f"{r.get('p50_agent/haproxy')} | {r.get('rps_agent/haproxy')} |")
        if ov.get("hey"):
            lines.append("")
            lines.append("hey (Go client), concurrency 64, req/s: " + "; ".join(
                f"`{k}` " + ", ".join(f"{n} {v.get('rps', 0):.0f}" for n, v in row.items())
                + f" (agent/haproxy {ov.get('hey_ratios', {}).get(k)}"
                + "".join(f", {ref}/haproxy {ov['hey_ratios'][f'{k} {ref}/haproxy']}"
                          for ref in RELAYS if f"{k} {ref}/haproxy" in ov.get("hey_ratios", {})) + ")"
                for k, row in ov["hey"].items()))
            if ov.get("cpu_ratios"):
                lines.append("")
                lines.append("CPU per request during those hey runs (process tree, µs): " + "; ".join(
                    f"`{k}` " + ", ".join(f"{n} {v['cpu_us_per_request']}" for n, v in row.items()
                                          if v.get("cpu_us_per_request"))
                    + f" (agent/haproxy {ov['cpu_ratios'].get(k)})"
                    for k, row in ov["hey"].items()))
        fixed = ov.get("fixed_rate")
        if isinstance(fixed, dict) and fixed.get("table"):
            lines.append("")
            lines.append(f"CPU per request at a fixed rate (hey, {fixed.get('connections')} connections, median of "
                         f"{fixed.get('rounds')} interleaved rounds, process tree, µs): " + "; ".join(
                             f"`{k}` " + ", ".join(f"{n} {v['cpu_us_per_request']}" for n, v in row.items())
                             + "".join(f" ({what} {fixed['ratios'][f'{k} {what}']})"
                                       for what in ("agent/haproxy", f"agent/{RELAY}", f"{RELAY}/haproxy",
                                                    f"agent/{CHECKED}", f"{CHECKED}/haproxy", "after/before")
                                       if f"{k} {what}" in fixed["ratios"])
                             for k, row in fixed["table"].items()))
        lines.append("")
    st = results.get("streaming")
    if isinstance(st, dict) and "save" in st:
        refs = [ref for ref in REFERENCES if ref in st["save"]]
        lines.append("| stream | client | direct MB/s | agent MB/s | agent/direct | agent RSS start -> peak MiB |"
                     + "".join(f" {ref} MB/s | {ref}/direct |" for ref in refs))
        lines.append("|---" * (6 + 2 * len(refs)) + "|")
        for case in ("save", "logs"):
            row = st[case]
            for client, sfx in (("docker CLI", ""), ("Python", "_python")):
                agent = row["agent" + sfx]
                lines.append(f"| {case} ({row['direct']['bytes'] / 2**20:.0f} MiB) | {client} | "
                             f"{row['direct' + sfx]['mb_per_s']} | {agent['mb_per_s']} | "
                             f"{row['mbps_agent/direct' + sfx]} | "
                             f"{agent['rss_start_mib']} -> {agent['rss_peak_mib']} |"
                             + "".join(f" {row[ref + sfx]['mb_per_s']} | {row[f'mbps_{ref}/direct' + sfx]} |"
                                       for ref in refs))
        lines.append("")
    fo = results.get("fanout")
    if isinstance(fo, dict) and "agent_p50_ms" in fo:
        lines.append(f"Fan-out, {fo['nodes']} nodes x {fo['containers_per_node']} containers: agent "
                     f"{fo['agent_p50_ms']} ms; nodes alone {fo['direct_alone_p50_ms']} ms (slowest "
                     f"{fo['slowest_node_p50_ms']}); all engines at once {fo['direct_all_at_once_p50_ms']} ms; "
                     f"agent/slowest {fo['p50_agent/slowest_node']}, agent/all-at-once "
                     f"{fo['p50_agent/direct_all_at_once']}.")
        bh = fo.get("blackhole") or {}
        if bh:
            lines.append(f"Blackholed {bh['node']}: answers {[a['ms'] for a in bh['answers']]} ms "
                         f"(deadline {fo['fanout_timeout_s'] * 1000:.0f} ms); worst with the node left out "
                         f"{bh['max_ms_with_node_left_out']} ms, extra over healthy {bh['extra_ms_over_healthy']} ms "
                         f"= {bh['extra/deadline']} x deadline.")
        lines.append("")
    rc = results.get("recovery")
    if isinstance(rc, dict) and "split_merged_after_heal_s" in rc:
        lines.append(f"Recovery, {rc['nodes']} nodes / {rc['managers']} managers (seconds): a promotion seen by "
                     f"every agent {rc['promotion_seen_by_all_s']}, a demotion {rc['demotion_seen_by_all_s']}; "
                     f"leader's agent killed: manager operations through a worker "
                     f"{rc['leader_agent_killed_manager_op_s']}, dropped from /agents "
                     f"{rc['leader_agent_killed_dropped_s']}, restarted and listed again "
                     f"{rc['agent_restarted_listed_s']}; leader's node cut off: first listing "
                     f"{rc['cut_first_listing_s']} (names it: {rc['cut_first_listing_names_it']}), second "
                     f"{rc['cut_second_listing_s']} (skips it: {rc['cut_second_listing_skips_it']}), manager "
                     f"operations back {rc['cut_manager_op_back_since_cut_s']} after the cut, every agent listed "
                     f"again {rc['cut_healed_all_listed_s']} after the repair; 2+3 split: sides apart "
                     f"{rc['split_sides_apart_s']}, one cluster {rc['split_merged_after_heal_s']} after the heal.")
        lines.append("")
    sm = results.get("sim")
    if isinstance(sm, dict) and "rows" in sm:
        lines.append("| simulated nodes | fan-out p50 ms | per node ms | direct fetch of all p50 ms | "
                     "RSS idle MiB | RSS per agent MiB | RSS peak MiB |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sm["rows"]:
            lines.append(f"| {r['nodes']} | {r['fanout_p50_ms']:.1f} | {r['fanout_per_node_ms']} | "
                         f"{r['direct_all_engines_p50_ms']:.1f} | {r['process_rss_idle_mib']} | "
                         f"{r['rss_per_agent_idle_mib']} | {r['process_rss_peak_mib']} |")
        lines.append("")
        for r in sm.get("entry_alone") or []:
            lines.append(f"The entry agent in a process of its own, {r['nodes']} simulated nodes: RSS "
                         f"{r['entry_rss_idle_mib']} MiB idle, {r['entry_rss_peak_mib']} MiB at its peak during "
                         f"the fan-outs (p50 {r['fanout_p50_ms']:.1f} ms, {r['response_bytes']} bytes).")
        lines.append("")
    su = results.get("startup")
    if isinstance(su, dict) and "agent_start_ms" in su:
        lines.append(f"Start-up to first 204 on /ping: {su['agent_start_ms']} ms (python + the same imports: "
                     f"{su['python_imports_start_ms']} ms, x{su['start_agent/python_imports']}); idle RSS "
                     f"{su['agent_idle_rss_mib']} MiB (python + imports {su['python_imports_idle_rss_mib']} MiB, "
                     f"HAProxy {su['haproxy_idle_rss_mib']} MiB).")
        lines.append("")
    ba = before_after(results)
    if ba:
        lines.append("Before/after (`--compare-tree`: the same measurements on a copy of the code before the change, "
                     "same run): " + "; ".join(f"{k} {v}" for k, v in ba.items()) + ".")
        lines.append("")
    tg = results.get("targets") or {}
    if tg:
        lines.append("| target | measured | wanted | met | the same ratio for the references, same run |")
        lines.append("|---|---|---|---|---|")
        for name, t in tg.items():
            same = ", ".join(f"{k} {v}" for k, v in (t.get("references") or {}).items())
            lines.append(f"| {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} | {same} |")
        lines.append("")
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines.append("Scenarios that failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return "\n".join(lines) + "\n"


def before_after(results: dict[str, Any]) -> dict[str, Any]:
    """The after/before ratios of a run with --compare-tree (empty without it)."""
    out: dict[str, Any] = {}
    ov = results.get("overhead") or {}
    for key, r in (ov.get("ratios") or {}).items():
        if "p50_after/before" in r:
            out[f"p50 after/before `{key}`"] = r["p50_after/before"]
            out[f"req/s after/before `{key}`"] = r["rps_after/before"]
    st = results.get("streaming") or {}
    for case in ("save", "logs"):
        for sfx, client in (("", "docker CLI"), ("_python", "Python client")):
            value = _get(st, case, "mbps_after/before" + sfx)
            if value is not None:
                out[f"MB/s after/before {case} ({client})"] = value
    sm = results.get("sim") or {}
    for nodes, value in (sm.get("p50_after/before") or {}).items():
        out[f"sim fan-out p50 after/before, {nodes} nodes"] = value
    rows, before = sm.get("rows") or [], sm.get("before_rows") or []
    for a, b in zip(rows, before, strict=False):
        out[f"sim peak RSS after/before, {a['nodes']} nodes"] = round(a["process_rss_peak_mib"] /
                                                                      b["process_rss_peak_mib"], 3)
    return out


if __name__ == "__main__":
    # `python -m bench.report DIR`: the targets and summary.md of DIR/latest.json again (after changing this file)
    import json
    import sys
    from pathlib import Path

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    data = json.loads((folder / "latest.json").read_text())
    data["targets"] = targets(data)
    (folder / "latest.json").write_text(json.dumps(data, indent=1))
    (folder / "summary.md").write_text(markdown(data))
    print(folder / "summary.md")
