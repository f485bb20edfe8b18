#!/usr/bin/env python3
"""The report of scripts/bench-e2e.sh: machine facts, one JSON of a run, its markdown
report and its latency-vs-concurrency plot (SVG, drawn here: no dependency beyond the
standard library).

  bench-report.py machine                     JSON of the machine, printed (run it first:
                                              it records the load average at start)
  bench-report.py assemble --machine M --rows R [--soak S]... [run facts] --out FILE
                                              one results JSON from the run's parts
  bench-report.py render RESULTS --markdown FILE --plot FILE
                                              the report and the plot; exits 1 if a row
                                              had transport errors or non-2xx answers

Every derived number (CPU per request, ratios, targets) is computed from the raw
measurements in RESULTS, so a results file can be re-rendered at any time.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from xml.sax.saxutils import escape

MODES = ["passthrough", "token-only", "compartment", "fga-hit", "fga-miss"]
MODE_LABEL = {
    "passthrough": "pass-through",
    "token-only": "token-only",
    "compartment": "compartment",
    "fga-hit": "OpenFGA, cache warm",
    "fga-miss": "OpenFGA, no cache",
}
MODE_COLOR = {
    "passthrough": "#444444",
    "token-only": "#1f77b4",
    "compartment": "#2ca02c",
    "fga-hit": "#ff7f0e",
    "fga-miss": "#d62728",
}
WORKLOADS = ["read", "search"]
WORKLOAD_LABEL = {"read": "read Patient/p1", "search": "search Observation?patient=p1"}
WORKLOAD_MD = {"read": "read `Patient/p1`", "search": "search `Observation?patient=p1`"}
UPSTREAM_LABEL = {
    "static": "fixed-answer upstream (examples/static_upstream.rs): the proxy's own cost",
    "real": "HAPI FHIR JPA server (tests/fixtures/base-bundle.json)",
}
# Processes measured per row besides the load generator (names from bench-e2e.sh).
TARGET_C = 8
RSS_C = 32
RSS_LIMIT_MIB = 30.0
# Soak: flat if the resident set at the end is within this much of the one after the
# first tenth of the soak (start-up allocations and caches filling are not growth).
SOAK_TOLERANCE = 0.05
SOAK_TOLERANCE_MIB = 1.0
SOAK_TARGET_SECONDS = 600
# A run is marked as a development run when the machine was not quiet.
BUSY_LOADAVG_PER_CPU = 0.5
BUSY_FOREIGN_SHARE = 0.05


# ---------------------------------------------------------------- machine, assemble


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def machine():
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    os_name = None
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirty = _run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_kib": mem_kib,
        "kernel": f"{platform.system()} {platform.release()}",
        "os": os_name,
        "rustc": _run(["rustc", "--version"]),
        "git_commit": _run(["git", "-C", repo, "rev-parse", "HEAD"]),
        "git_branch": _run(["git", "-C", repo, "rev-parse", "--abbrev-ref", "HEAD"]),
        "git_dirty": None if dirty is None else bool(dirty),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": _loadavg(),
    }


def assemble(a):
    with open(a.machine) as f:
        mach = json.load(f)
    with open(a.rows) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    soak = None
    if a.soak:
        parts = []
        for path in a.soak:
            with open(path) as f:
                parts.append(json.loads(f.read()))
        soak = {"mode": "compartment", "workloads": ["read", "search"], "parts": parts}
    results = {
        "schema": 1,
        "machine": mach,
        "run": {
            "command": a.command,
            "pinning": a.pinning,
            "server_cpus": a.server_cpus or None,
            "loadgen_cpus": a.loadgen_cpus or None,
            "affinity": dict(x.split("=", 1) for x in a.affinity),
            "seconds": a.seconds,
            "warmup_seconds": a.warmup,
            "max_requests": a.requests,
            "elapsed_seconds": a.elapsed,
            "loadavg_end": _loadavg(),
        },
        "rows": rows,
        "soak": soak,
    }
    derived = derive(results)
    results["derived"] = {
        "rows": derived["rows"],
        "targets": derived["targets"],
        "soak": derived["soak"],
        "busy": derived["busy"],
    }
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- derived numbers


def _tick_ms(proc):
    """CPU time from /proc/PID/stat (10 ms ticks): comparable with /proc/stat."""
    if not proc:
        return None
    return proc.get("user_ms", 0.0) + proc.get("sys_ms", 0.0)


def _cpu_ms(proc):
    """CPU time, exact (schedstat) where the load generator could read it."""
    if not proc:
        return None
    return proc["run_ms"] if proc.get("run_ms") is not None else _tick_ms(proc)


def _sys_ms(proc):
    """The kernel's part of _cpu_ms, in the proportion the ticks give."""
    ticks = _tick_ms(proc)
    if not ticks:
        return None if proc is None else 0.0
    return _cpu_ms(proc) * proc.get("sys_ms", 0.0) / ticks


def derive_row(row):
    r = row["result"]
    n = r.get("requests", 0)
    procs = r.get("processes") or {}
    statuses = {str(k): v for k, v in (r.get("statuses") or {}).items()}
    non2xx = sum(v for k, v in statuses.items() if not k.startswith("2"))
    per_req = lambda ms: None if ms is None or n == 0 else ms * 1000.0 / n  # noqa: E731
    server = procs.get(row.get("server"))
    upstream = procs.get(row.get("upstream_process"))
    openfga = procs.get("openfga")
    machine_cpu = r.get("machine") or None
    foreign = None
    if machine_cpu and machine_cpu.get("total_ms"):
        ours = sum(_tick_ms(p) or 0.0 for p in procs.values())
        foreign = max(0.0, machine_cpu["busy_ms"] - ours) / machine_cpu["total_ms"]
    hwm = server.get("hwm_kib") if server else None
    d = {
        "upstream": row["upstream"],
        "mode": row["mode"],
        "workload": row["workload"],
        "concurrency": row["concurrency"],
        "requests": n,
        "errors": r.get("errors", 0),
        "non_2xx": non2xx,
        "statuses": statuses,
        "ok": n > 0 and r.get("errors", 0) == 0 and non2xx == 0,
        "rps": r.get("rps", 0.0),
        "p50_ms": r.get("p50_ms"),
        "p90_ms": r.get("p90_ms"),
        "p99_ms": r.get("p99_ms"),
        "cpu_us_per_req": per_req(_cpu_ms(server)),
        "cpu_user_us_per_req": per_req(None if server is None else _cpu_ms(server) - _sys_ms(server)),
        "cpu_sys_us_per_req": per_req(_sys_ms(server)),
        "upstream_cpu_us_per_req": per_req(_cpu_ms(upstream)),
        "openfga_cpu_us_per_req": per_req(_cpu_ms(openfga)),
        "loadgen_cpu_us_per_req": per_req(_cpu_ms(procs.get("loadgen"))),
        "peak_rss_mib": None if hwm is None else hwm / 1024.0,
        "peak_reset": bool(server and server.get("peak_reset")),
        "foreign_cpu_share": foreign,
    }
    parts = [d["cpu_us_per_req"], d["upstream_cpu_us_per_req"], d["openfga_cpu_us_per_req"]]
    d["server_side_cpu_us_per_req"] = None if None in parts else sum(parts)
    return d


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def derive(results):
    rows = [derive_row(r) for r in results.get("rows", [])]
    index = {(d["upstream"], d["mode"], d["workload"], d["concurrency"]): d for d in rows}
    for d in rows:
        base = index.get((d["upstream"], "passthrough", d["workload"], d["concurrency"]))
        d["rps_ratio"] = _ratio(d["rps"], base and base["rps"])
        d["cpu_ratio"] = _ratio(d["cpu_us_per_req"], base and base["cpu_us_per_req"])
        d["p50_ratio"] = _ratio(d["p50_ms"], base and base["p50_ms"])
    soak = derive_soak(results.get("soak"))
    targets = derive_targets(index, rows, soak)
    mach = results.get("machine") or {}
    load = mach.get("loadavg_start")
    cpus = mach.get("cpus_usable") or mach.get("cpus") or 1
    shares = [d["foreign_cpu_share"] for d in rows if d["foreign_cpu_share"] is not None]
    busy = {
        "loadavg_start_1min": load[0] if load else None,
        "foreign_cpu_share_median": statistics.median(shares) if shares else None,
        "foreign_cpu_share_max": max(shares) if shares else None,
    }
    reasons = []
    if load and load[0] > BUSY_LOADAVG_PER_CPU * cpus:
        reasons.append(f"load average {load[0]:.2f} at start on {cpus} CPUs")
    if shares and statistics.median(shares) > BUSY_FOREIGN_SHARE:
        reasons.append(
            f"other processes took {100 * statistics.median(shares):.0f}% of the machine's CPU "
            f"during the median row (at most {100 * max(shares):.0f}%)"
        )
    busy["development_run"] = bool(reasons)
    busy["reasons"] = reasons
    return {"rows": rows, "index": index, "targets": targets, "soak": soak, "busy": busy}


def derive_soak(soak):
    if not soak:
        return None
    parts = soak.get("parts") or []
    samples = [s for p in parts for s in (p.get("samples") or [])]
    rss = [(s["t"], s["rss_kib"].get("proxy")) for s in samples if s.get("rss_kib", {}).get("proxy")]
    requests = sum(p.get("requests", 0) for p in parts)
    seconds = max((p.get("seconds", 0.0) for p in parts), default=0.0)
    errors = sum(p.get("errors", 0) for p in parts)
    non2xx = sum(v for p in parts for k, v in (p.get("statuses") or {}).items() if not str(k).startswith("2"))
    peaks = [((p.get("processes") or {}).get("proxy") or {}).get("hwm_kib") for p in parts]
    peaks = [x for x in peaks if x]
    d = {
        "seconds": seconds,
        "requests": requests,
        "rps": requests / seconds if seconds else 0.0,
        "errors": errors,
        "non_2xx": non2xx,
        "samples": len(rss),
        "first_mib": None,
        "settled_mib": None,
        "last_mib": None,
        "peak_mib": max(peaks) / 1024.0 if peaks else None,
        "growth_mib": None,
        "flat": None,
        "series": [[t, v / 1024.0] for t, v in rss],
    }
    if rss:
        settled = next((v for t, v in rss if t >= seconds / 10), rss[-1][1])
        d["first_mib"] = rss[0][1] / 1024.0
        d["settled_mib"] = settled / 1024.0
        d["last_mib"] = rss[-1][1] / 1024.0
        d["peak_mib"] = max(d["peak_mib"] or 0.0, max(v for _, v in rss) / 1024.0)
        d["growth_mib"] = d["last_mib"] - d["settled_mib"]
        allowed = max(SOAK_TOLERANCE_MIB, SOAK_TOLERANCE * d["settled_mib"])
        d["flat"] = d["growth_mib"] <= allowed
        d["allowed_growth_mib"] = allowed
    return d


def _target(text, measured, op, limit, fmt, rows, note=None):
    t = {"target": text, "op": op, "limit": limit, "measured": measured, "fmt": fmt, "rows": rows}
    if note:
        t["note"] = note
    if measured is None:
        t["met"] = None
    else:
        t["met"] = measured >= limit if op == ">=" else measured <= limit
    return t


def derive_targets(index, rows, soak):
    def get(mode, workload, c=TARGET_C):
        return index.get(("static", mode, workload, c))

    targets = []
    c = TARGET_C
    cr, pr = get("compartment", "read"), get("passthrough", "read")
    targets.append(_target(f"compartment-mode read: throughput >= 0.80x pass-through at c={c}",
                           cr and cr["rps_ratio"], ">=", 0.80, "x",
                           [("static", "compartment", "read", c), ("static", "passthrough", "read", c)]))
    targets.append(_target(f"compartment-mode read: CPU per request <= 1.5x pass-through at c={c}",
                           cr and cr["cpu_ratio"], "<=", 1.5, "x",
                           [("static", "compartment", "read", c), ("static", "passthrough", "read", c)]))
    cs = get("compartment", "search")
    targets.append(_target(f"10 KB search (compartment mode): throughput >= 0.60x pass-through at c={c}",
                           cs and cs["rps_ratio"], ">=", 0.60, "x",
                           [("static", "compartment", "search", c), ("static", "passthrough", "search", c)]))
    for w in WORKLOADS:
        fh, cm = get("fga-hit", w), get("compartment", w)
        targets.append(_target(
            f"OpenFGA mode, warm cache, {WORKLOAD_LABEL[w]}: throughput within 10% of compartment mode at c={c}",
            _ratio(fh and fh["rps"], cm and cm["rps"]), ">=", 0.90, "x of compartment",
            [("static", "fga-hit", w, c), ("static", "compartment", w, c)]))
    at32 = [d for d in rows if d["concurrency"] == RSS_C and d["mode"] != "passthrough"]
    peak = max((d["peak_rss_mib"] for d in at32 if d["peak_rss_mib"] is not None), default=None)
    worst = max(at32, key=lambda d: d["peak_rss_mib"] or 0.0, default=None)
    targets.append(_target(f"proxy RSS under {RSS_LIMIT_MIB:.0f} MiB at c={RSS_C} (peak over its rows)",
                           peak, "<=", RSS_LIMIT_MIB, "MiB",
                           [(worst["upstream"], worst["mode"], worst["workload"], RSS_C)] if worst else []))
    note = None
    growth = None
    if soak is None:
        note = f"not measured: run with --soak {SOAK_TARGET_SECONDS}"
    else:
        growth = soak["growth_mib"]
        if soak["seconds"] < SOAK_TARGET_SECONDS * 0.99:
            note = f"the soak ran {soak['seconds']:.0f} s; the target is {SOAK_TARGET_SECONDS} s"
    t = _target("flat RSS over a 10-minute soak (growth after the first tenth)", growth, "<=",
                soak.get("allowed_growth_mib", SOAK_TOLERANCE_MIB) if soak else SOAK_TOLERANCE_MIB,
                "MiB", [], note)
    if soak and soak["seconds"] < SOAK_TARGET_SECONDS * 0.99 and t["met"]:
        t["met"] = None  # flat, but not for long enough to count
    targets.append(t)
    return targets


# ---------------------------------------------------------------- markdown


def _f(x, digits=2, dash="–"):
    if x is None:
        return dash
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return dash
    return f"{x:.{digits}f}"


def _n(x):
    return "–" if x is None else f"{x:,.0f}"


def _answers(d):
    s = ", ".join(f"{k} x{v}" for k, v in sorted(d["statuses"].items()))
    if d["ok"]:
        return s
    extra = f", transport errors {d['errors']}" if d["errors"] else ""
    return f"**FLAGGED** {s or 'no answers'}{extra}"


def _measured(t):
    if t["measured"] is None:
        return "not measured"
    if t["fmt"] == "MiB":
        return f"{t['measured']:.2f} MiB"
    return f"{t['measured']:.2f}{t['fmt']}"


def _verdict(t):
    m, lim = t["measured"], t["limit"]
    if m is None:
        return t.get("note", "–")
    unit = " MiB" if t["fmt"] == "MiB" else ""
    if t["met"] is None:
        return f"not decided: {t.get('note', '')}"
    if t["op"] == ">=":
        gap = lim - m
        word = "met" if t["met"] else "**missed**"
        rel = f" ({100 * gap / lim:.0f}% short)" if not t["met"] else f" (margin {-gap:.2f}{unit})"
        return f"{word}{'' if t['met'] else f' by {gap:.2f}{unit}'}{rel}"
    gap = m - lim
    word = "met" if t["met"] else "**missed**"
    rel = f" ({100 * gap / lim:.0f}% over)" if not t["met"] else f" (margin {-gap:.2f}{unit})"
    return f"{word}{'' if t['met'] else f' by {gap:.2f}{unit}'}{rel}"


def _row_table(ds):
    out = [
        "| mode | c | requests | req/s | p50 ms | p90 ms | p99 ms | proxy CPU µs/req | of it kernel | "
        "upstream + OpenFGA CPU µs/req | proxy peak RSS MiB | req/s vs pass-through | "
        "CPU/req vs pass-through | answers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for d in ds:
        other = None
        if d["upstream_cpu_us_per_req"] is not None:
            other = d["upstream_cpu_us_per_req"] + (d["openfga_cpu_us_per_req"] or 0.0)
        rss = _f(d["peak_rss_mib"], 1) + ("" if d["peak_reset"] or d["peak_rss_mib"] is None else " (lifetime)")
        out.append(
            f"| {MODE_LABEL.get(d['mode'], d['mode'])} | {d['concurrency']} | {_n(d['requests'])} | "
            f"{_n(d['rps'])} | {_f(d['p50_ms'])} | {_f(d['p90_ms'])} | {_f(d['p99_ms'])} | "
            f"{_f(d['cpu_us_per_req'], 1)} | {_f(d['cpu_sys_us_per_req'], 1)} | {_f(other, 1)} | {rss} | "
            f"{_f(d['rps_ratio'])} | {_f(d['cpu_ratio'])} | {_answers(d)} |"
        )
    return out


def _where(t, index):
    """Where the time goes, for a missed throughput or CPU target: the two rows' CPU per
    request by process, and what the pinned server CPU allows."""
    rows = [index.get(tuple(k)) for k in t["rows"]]
    if t["fmt"] == "MiB":
        d = rows[0] if rows else None
        if not d:
            return []
        peaks = sorted(
            ((k, v) for k, v in index.items() if k[3] == RSS_C and v["peak_rss_mib"] is not None and k[1] != "passthrough"),
            key=lambda kv: -kv[1]["peak_rss_mib"],
        )
        lines = [f"Peak resident set of the proxy per row at c={RSS_C}:", ""]
        lines += [f"- {k[0]} {WORKLOAD_MD[k[2]]}, {MODE_LABEL[k[1]]}: {v['peak_rss_mib']:.1f} MiB" for k, v in peaks]
        return lines
    if len(rows) < 2 or None in rows:
        return []
    a, b = rows
    # Columns from the baseline to the row that missed; for a compartment row against
    # pass-through, token-only in between splits the cost into the stages every mode pays
    # (token, scopes, forwarding) and what compartment mode adds (narrowing, record checks).
    cols = [b, a]
    if a["mode"] == "compartment" and b["mode"] == "passthrough":
        mid = index.get((a["upstream"], "token-only", a["workload"], a["concurrency"]))
        if mid:
            cols = [b, mid, a]
    steps = list(zip(cols, cols[1:]))
    head = " | ".join(MODE_LABEL[c["mode"]] for c in cols)
    step_head = " | ".join(f"{MODE_LABEL[y['mode']]} - {MODE_LABEL[x['mode']]}" for x, y in steps)
    lines = [
        f"| per request | {head} | {step_head} |",
        "| --- |" + " ---: |" * (len(cols) + len(steps)),
    ]

    def line(label, key, digits=1):
        vals = [_f(c[key], digits) for c in cols]
        diffs = [_f(None if x[key] is None or y[key] is None else y[key] - x[key], digits) for x, y in steps]
        lines.append(f"| {label} | {' | '.join(vals)} | {' | '.join(diffs)} |")

    line("proxy CPU, user µs", "cpu_user_us_per_req")
    line("proxy CPU, kernel µs", "cpu_sys_us_per_req")
    line("upstream CPU µs", "upstream_cpu_us_per_req")
    line("OpenFGA CPU µs", "openfga_cpu_us_per_req")
    line("measured side (pinned), µs", "server_side_cpu_us_per_req")
    line("load generator CPU µs", "loadgen_cpu_us_per_req")
    line("latency p50 ms", "p50_ms", 3)
    line("throughput req/s", "rps", 0)
    sa, sb = a["server_side_cpu_us_per_req"], b["server_side_cpu_us_per_req"]
    if sa and sb:
        lines += [
            "",
            f"With the measured processes pinned to their own CPUs, throughput at saturation is "
            f"bounded by their CPU per request: {sb:.1f} µs for {MODE_LABEL[b['mode']]} against "
            f"{sa:.1f} µs for {MODE_LABEL[a['mode']]}, a ratio of {sb / sa:.2f} (measured throughput "
            f"ratio {_f(_ratio(a['rps'], b['rps']))}; a gap between the two is waiting, or CPU taken by other "
            "processes). Extra user time is the proxy's own work (`cargo bench --bench token_scope`, "
            "`--bench authz` and `--bench openfga` measure its stages alone); extra kernel time is "
            "system calls and loopback TCP.",
        ]
    return lines


def render_markdown(results, der, plot_rel):
    mach, run = results.get("machine") or {}, results.get("run") or {}
    busy = der["busy"]
    out = ["# Benchmarks", ""]
    out += [
        "Written by `scripts/bench-e2e.sh` (with `scripts/bench-report.py`) from one run; every "
        "number comes from that run's results JSON. Regenerate it rather than edit it; the README "
        "(*Benchmarks*) says how to read it.",
        "",
    ]
    if busy["development_run"]:
        out += [
            f"> **Development run on a busy machine** ({'; '.join(busy['reasons'])}). Absolute numbers "
            "and ratios are noisy; a trustworthy run needs a quiet machine.",
            "",
        ]
    load = mach.get("loadavg_start")
    load_end = run.get("loadavg_end")
    mem = mach.get("memory_kib")
    commit = mach.get("git_commit") or "?"
    dirty = " (with uncommitted changes)" if mach.get("git_dirty") else ""
    fshare = busy.get("foreign_cpu_share_median")
    out += [
        "## Machine and run",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {mach.get('cpu_model') or '?'}, {mach.get('cpus') or '?'} CPUs ({mach.get('cpus_usable') or '?'} usable) |",
        f"| memory | {_f(mem / 1048576 if mem else None, 1)} GiB |",
        f"| system | {mach.get('kernel') or '?'}{', ' + mach['os'] if mach.get('os') else ''} |",
        f"| rustc | {mach.get('rustc') or '?'} |",
        f"| commit | `{commit[:12]}` on `{mach.get('git_branch') or '?'}`{dirty} |",
        f"| date | {mach.get('date_utc') or '?'} |",
        f"| load average at start (1 / 5 / 15 min) | {' / '.join(f'{x:.2f}' for x in load) if load else '?'} |",
        f"| load average at the end | {' / '.join(f'{x:.2f}' for x in load_end) if load_end else '?'} |",
        f"| other processes' share of the machine's CPU during a row | median {_f(fshare and 100 * fshare, 1)}%, "
        f"max {_f(busy.get('foreign_cpu_share_max') and 100 * busy['foreign_cpu_share_max'], 1)}% |",
        f"| pinning | {run.get('pinning') or '?'} |",
        f"| CPUs allowed, per process | {', '.join(f'{k} {v}' for k, v in sorted((run.get('affinity') or {}).items())) or '?'} |",
        f"| each row | {_f(run.get('warmup_seconds'), 1)} s warm-up (unmeasured, same connections), then "
        f"{_f(run.get('seconds'), 1)} s or {_n(run.get('max_requests'))} requests measured |",
        f"| elapsed | {_n(run.get('elapsed_seconds'))} s (start to the last row) |",
        "",
        "Command:",
        "",
        "```",
        run.get("command") or "scripts/bench-e2e.sh",
        "```",
        "",
    ]
    flagged = [d for d in der["rows"] if not d["ok"]]
    if flagged:
        out += [
            f"> **{len(flagged)} row(s) flagged**: transport errors or non-2xx answers "
            "(marked FLAGGED below; their numbers are not comparable).",
            "",
        ]
    upstreams = [u for u in ("static", "real") if any(d["upstream"] == u for d in der["rows"])]
    upstreams += sorted({d["upstream"] for d in der["rows"]} - set(upstreams))
    for u in upstreams:
        out += [f"## Results: {UPSTREAM_LABEL.get(u, u)}", ""]
        for w in WORKLOADS:
            ds = [d for d in der["rows"] if d["upstream"] == u and d["workload"] == w]
            if not ds:
                continue
            ds.sort(key=lambda d: (d["concurrency"], MODES.index(d["mode"]) if d["mode"] in MODES else 99))
            out += [f"### {WORKLOAD_MD[w]}", ""] + _row_table(ds) + [""]
    out += ["## Targets", "", f"Ratios from the fixed-answer upstream rows of this run, at c={TARGET_C} unless stated.", ""]
    out += ["| target | measured | result |", "| --- | ---: | --- |"]
    for t in der["targets"]:
        out.append(f"| {t['target']} | {_measured(t)} | {_verdict(t)} |")
    out.append("")
    missed = [t for t in der["targets"] if t["met"] is False]
    if missed:
        out += ["## Where the time goes (missed targets)", ""]
        groups = {}
        for t in missed:
            groups.setdefault(json.dumps(t["rows"]), []).append(t)
        for ts in groups.values():
            body = _where(ts[0], der["index"])
            if body:
                out += ["### " + "; ".join(t["target"] for t in ts), ""] + body + [""]
    s = der["soak"]
    if s:
        answers = "ok"
        if s["errors"] or s["non_2xx"]:
            answers = f"**FLAGGED** non-2xx {s['non_2xx']}, transport errors {s['errors']}"
        out += [
            "## Soak",
            "",
            "Compartment mode, read and search at the same time (c=16 each), the proxy's `VmRSS` sampled "
            "throughout.",
            "",
            "| seconds | requests | req/s | RSS first / after a tenth / last / peak MiB | growth MiB | flat | answers |",
            "| ---: | ---: | ---: | --- | ---: | --- | --- |",
            f"| {_n(s['seconds'])} | {_n(s['requests'])} | {_n(s['rps'])} | {_f(s['first_mib'], 1)} / "
            f"{_f(s['settled_mib'], 1)} / {_f(s['last_mib'], 1)} / {_f(s['peak_mib'], 1)} | {_f(s['growth_mib'], 2)} | "
            f"{'yes' if s['flat'] else 'no' if s['flat'] is False else '–'} | "
            f"{answers} |",
            "",
        ]
    out += [
        "## Latency vs concurrency",
        "",
        f"![p50 (solid) and p99 (dashed) latency per mode against concurrency]({plot_rel})",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- SVG


def _log_ticks(lo, hi):
    ticks = []
    e = math.floor(math.log10(lo))
    while 10**e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10**e
            if lo * 0.9999 <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    return ticks


def _tick_label(v):
    return f"{v:g}" if v >= 0.01 else f"{v:.0e}"


def render_svg(der):
    rows = [d for d in der["rows"] if d["p50_ms"] and d["p99_ms"]]
    panels = [(u, w) for u in ("static", "real") for w in WORKLOADS if any(d["upstream"] == u and d["workload"] == w for d in rows)]
    pw, ph, ml, mr, mt, mb = 420, 300, 60, 20, 40, 45
    legend_h = 70
    cols = 2
    nrows = max(1, math.ceil(len(panels) / cols))
    width, height = cols * pw, nrows * ph + legend_h
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for i, (u, w) in enumerate(panels):
        x0, y0 = (i % cols) * pw, (i // cols) * ph
        ds = [d for d in rows if d["upstream"] == u and d["workload"] == w]
        cs = sorted({d["concurrency"] for d in ds})
        lo = min(d["p50_ms"] for d in ds)
        hi = max(d["p99_ms"] for d in ds)
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        if hi <= lo:
            hi = lo * 10
        left, right, top, bottom = x0 + ml, x0 + pw - mr, y0 + mt, y0 + ph - mb
        xl = [math.log2(c) for c in cs]
        xspan = (max(xl) - min(xl)) or 1.0
        pad = 18  # keeps the first and last markers off the frame

        def X(c):
            if len(cs) == 1:
                return (left + right) / 2
            return left + pad + (math.log2(c) - min(xl)) / xspan * (right - left - 2 * pad)

        def Y(v):
            return bottom - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)

        title = f"{'fixed-answer upstream' if u == 'static' else 'HAPI' if u == 'real' else u}: {WORKLOAD_LABEL[w]}"
        svg.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 + 22}" text-anchor="middle" font-size="13">{escape(title)}</text>')
        svg.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>')
        for v in _log_ticks(lo, hi):
            y = Y(v)
            major = abs(math.log10(v) - round(math.log10(v))) < 1e-9
            svg.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{"#ccc" if major else "#eee"}"/>')
            svg.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(_tick_label(v))}</text>')
        for c in cs:
            x = X(c)
            svg.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#999"/>')
            svg.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{c}</text>')
        svg.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 34}" text-anchor="middle">concurrency (connections)</text>')
        svg.append(
            f'<text x="{x0 + 14}" y="{(top + bottom) / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 {x0 + 14} {(top + bottom) / 2:.1f})">latency ms (log)</text>'
        )
        for m in MODES:
            pts = sorted((d for d in ds if d["mode"] == m), key=lambda d: d["concurrency"])
            if not pts:
                continue
            color = MODE_COLOR[m]
            for key, dash in (("p50_ms", ""), ("p99_ms", ' stroke-dasharray="5,3"')):
                path = " ".join(f"{X(d['concurrency']):.1f},{Y(d[key]):.1f}" for d in pts)
                svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
                for d in pts:
                    fill = color if key == "p50_ms" else "white"
                    tip = f"{MODE_LABEL[m]}, c={d['concurrency']}: {key[:3]} {d[key]:.3f} ms"
                    svg.append(
                        f'<circle cx="{X(d["concurrency"]):.1f}" cy="{Y(d[key]):.1f}" r="3" fill="{fill}" stroke="{color}">'
                        f"<title>{escape(tip)}</title></circle>"
                    )
                    if not d["ok"]:
                        svg.append(f'<text x="{X(d["concurrency"]) + 5:.1f}" y="{Y(d[key]) - 4:.1f}" fill="#d62728">!</text>')
    ly = nrows * ph + 15
    for j, m in enumerate(MODES):
        lx = 20 + j * (width - 40) / len(MODES)
        svg.append(f'<line x1="{lx:.1f}" y1="{ly}" x2="{lx + 22:.1f}" y2="{ly}" stroke="{MODE_COLOR[m]}" stroke-width="2"/>')
        svg.append(f'<text x="{lx + 27:.1f}" y="{ly + 4}">{escape(MODE_LABEL[m])}</text>')
    svg.append(
        f'<text x="20" y="{ly + 28}">solid, filled: p50; dashed, open: p99; "!" marks a flagged row '
        "(errors or non-2xx answers). One run; see BENCHMARKS.md.</text>"
    )
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def render(a):
    with open(a.results) as f:
        results = json.load(f)
    der = derive(results)
    plot_rel = os.path.relpath(os.path.abspath(a.plot), os.path.dirname(os.path.abspath(a.markdown)))
    md = render_markdown(results, der, plot_rel)
    with open(a.markdown, "w") as f:
        f.write(md)
    with open(a.plot, "w") as f:
        f.write(render_svg(der))
    # The targets and any flagged rows on stdout, so a terminal run shows the verdict.
    for t in der["targets"]:
        measured = "" if t["measured"] is None else f"{_measured(t)}: "
        print(f"{t['target']}: {measured}{_verdict(t)}")
    flagged = [d for d in der["rows"] if not d["ok"]]
    for d in flagged:
        print(f"FLAGGED: {d['upstream']} {d['workload']} {d['mode']} c={d['concurrency']}: "
              f"statuses {d['statuses']}, transport errors {d['errors']}")
    return 1 if flagged else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("machine")
    a = sub.add_parser("assemble")
    a.add_argument("--machine", required=True)
    a.add_argument("--rows", required=True)
    a.add_argument("--soak", action="append", default=[])
    a.add_argument("--command", default="")
    a.add_argument("--pinning", default="")
    a.add_argument("--server-cpus", default="")
    a.add_argument("--loadgen-cpus", default="")
    a.add_argument("--affinity", action="append", default=[])
    a.add_argument("--seconds", type=float)
    a.add_argument("--warmup", type=float)
    a.add_argument("--requests", type=int)
    a.add_argument("--elapsed", type=float)
    a.add_argument("--out", required=True)
    r = sub.add_parser("render")
    r.add_argument("results")
    r.add_argument("--markdown", required=True)
    r.add_argument("--plot", required=True)
    args = p.parse_args(argv)
    if args.cmd == "machine":
        json.dump(machine(), sys.stdout, indent=2)
        print()
        return 0
    if args.cmd == "assemble":
        assemble(args)
        return 0
    return render(args)


if __name__ == "__main__":
    sys.exit(main())
