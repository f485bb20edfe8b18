"""scripts/bench-report.py on a synthetic run: the results JSON it assembles, the
report's tables, targets and flags, and a well-formed SVG plot. No servers; about a
second. Run: python3 -m unittest discover -s scripts/tests
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-report.py")
MODES = ["passthrough", "token-only", "compartment", "fga-hit", "fga-miss"]
SVG = "{http://www.w3.org/2000/svg}"


def result(rps, cpu_us, server, requests=4000, statuses=None, rss_kib=20480):
    """One loadgen answer: `cpu_us` of `server` per request, a quarter of it kernel."""
    cpu_ms = cpu_us * requests / 1000.0
    procs = {
        name: {"user_ms": 10.0, "sys_ms": 10.0, "run_ms": 20.0, "hwm_kib": 4096, "rss_kib": 4096, "peak_reset": True}
        for name in ("proxy", "passthrough-static", "upstream-static", "openfga")
    }
    procs[server] = {
        "user_ms": 0.75 * cpu_ms, "sys_ms": 0.25 * cpu_ms, "run_ms": cpu_ms,
        "hwm_kib": rss_kib, "rss_kib": rss_kib, "peak_reset": True,
    }
    procs["loadgen"] = {"user_ms": 100.0, "sys_ms": 100.0, "run_ms": 200.0}
    # A quiet machine: nothing but the measured processes was busy.
    busy = sum(p["user_ms"] + p["sys_ms"] for p in procs.values())
    return {
        "requests": requests, "errors": 0, "statuses": statuses or {"200": requests},
        "seconds": requests / rps, "rps": rps, "concurrency": 8, "mean_ms": 1.0,
        "p50_ms": 1000.0 / rps, "p90_ms": 2000.0 / rps, "p99_ms": 4000.0 / rps, "max_ms": 9.0,
        "processes": procs, "machine": {"busy_ms": busy, "total_ms": 2 * busy}, "samples": None,
    }


# Throughput and proxy CPU per request, by mode, as ratios of pass-through.
SHAPE = {"passthrough": (1.0, 1.0), "token-only": (0.9, 1.2), "compartment": (0.7, 1.4),
         "fga-hit": (0.68, 1.45), "fga-miss": (0.1, 5.0)}


def rows(flag=None):
    out = []
    for w in ("read", "search"):
        for c in (1, 8, 32):
            for m in MODES:
                rps_ratio, cpu_ratio = SHAPE[m]
                server = "passthrough-static" if m == "passthrough" else "proxy"
                statuses = {"200": 3990, "503": 10} if (m, w, c) == flag else None
                out.append({
                    "upstream": "static", "mode": m, "workload": w, "concurrency": c, "server": server,
                    "upstream_process": "upstream-static",
                    "result": result(8000 * rps_ratio, 50 * cpu_ratio, server, statuses=statuses,
                                     rss_kib=(40 if c == 32 and m == "fga-miss" else 20) * 1024),
                })
    return out


MACHINE = {
    "cpu_model": "Test CPU", "cpus": 2, "cpus_usable": 2, "memory_kib": 8 << 20, "kernel": "Linux 6.1",
    "os": "Test OS", "rustc": "rustc 1.95.0", "git_commit": "0123456789abcdef", "git_branch": "bench",
    "git_dirty": False, "date_utc": "2026-01-01 00:00 UTC", "loadavg_start": [0.05, 0.1, 0.1],
}


class BenchReportTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def run_report(self, *args):
        return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True)

    def assemble_and_render(self, flag=None, soak=None):
        with open(self.path("machine.json"), "w") as f:
            json.dump(MACHINE, f)
        with open(self.path("rows.jsonl"), "w") as f:
            for r in rows(flag):
                f.write(json.dumps(r) + "\n")
        extra = []
        if soak:
            with open(self.path("soak.json"), "w") as f:
                json.dump(soak, f)
            extra = ["--soak", self.path("soak.json")]
        a = self.run_report(
            "assemble", "--machine", self.path("machine.json"), "--rows", self.path("rows.jsonl"), *extra,
            "--command", "scripts/bench-e2e.sh", "--pinning", "load generator on CPU 1; the rest on CPU 0",
            "--server-cpus", "0", "--loadgen-cpus", "1", "--affinity", "proxy=0", "--affinity", "loadgen=1",
            "--seconds", "4", "--warmup", "1", "--requests", "1000000", "--elapsed", "170",
            "--out", self.path("results.json"))
        self.assertEqual(a.returncode, 0, a.stderr)
        os.makedirs(self.path("docs"))
        r = self.run_report("render", self.path("results.json"), "--markdown", self.path("BENCHMARKS.md"),
                            "--plot", self.path("docs/plot.svg"))
        with open(self.path("BENCHMARKS.md")) as f:
            md = f.read()
        return r, md

    def test_tables_targets_and_plot(self):
        r, md = self.assemble_and_render()
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("| mode | c | requests | req/s | p50 ms | p90 ms | p99 ms |", md)
        self.assertIn("### read `Patient/p1`", md)
        self.assertIn("### search `Observation?patient=p1`", md)
        # 5 modes x 3 concurrencies per workload table.
        self.assertEqual(sum(1 for line in md.splitlines() if line.startswith("| compartment | ")), 6)
        self.assertIn("| compartment | 8 | 4,000 | 5,600 |", md)
        self.assertIn("scripts/bench-e2e.sh", md)
        self.assertIn("Test CPU", md)
        self.assertNotIn("Development run", md)
        self.assertNotIn("FLAGGED", md)
        # Targets: 0.70x < 0.80x missed by 0.10; CPU 1.40x <= 1.5x met; FGA 0.68/0.70 = 0.97 met;
        # RSS 40 MiB at c=32 missed; no soak.
        self.assertIn("| compartment-mode read: throughput >= 0.80x pass-through at c=8 | 0.70x | **missed** by 0.10 (", md)
        self.assertIn("| compartment-mode read: CPU per request <= 1.5x pass-through at c=8 | 1.40x | met", md)
        self.assertIn("0.97x of compartment | met", md)
        self.assertIn("| 40.00 MiB | **missed** by 10.00 MiB", md)
        self.assertIn("not measured: run with --soak 600", md)
        self.assertIn("## Where the time goes (missed targets)", md)
        # pass-through -> token-only -> compartment, and the two steps.
        self.assertIn("| per request | pass-through | token-only | compartment | token-only - pass-through | "
                      "compartment - token-only |", md)
        self.assertIn("| proxy CPU, user µs | 37.5 | 45.0 | 52.5 | 7.5 | 7.5 |", md)
        self.assertIn("](docs/plot.svg)", md)
        results = json.load(open(self.path("results.json")))
        self.assertEqual(len(results["rows"]), 30)
        self.assertEqual(len(results["derived"]["targets"]), 7)
        self.assertAlmostEqual(results["derived"]["rows"][0]["cpu_us_per_req"], 50.0)
        root = ET.parse(self.path("docs/plot.svg")).getroot()
        self.assertEqual(root.tag, SVG + "svg")
        # Two panels (read, search), p50 and p99 per mode.
        self.assertEqual(len(root.findall(f"{SVG}polyline")), 2 * len(MODES) * 2)

    def test_flagged_row_and_busy_machine(self):
        global MACHINE
        quiet = MACHINE
        MACHINE = dict(MACHINE, loadavg_start=[1.9, 1.0, 1.0])
        try:
            r, md = self.assemble_and_render(flag=("fga-miss", "search", 32))
        finally:
            MACHINE = quiet
        self.assertEqual(r.returncode, 1)
        self.assertIn("FLAGGED: static search fga-miss c=32", r.stdout)
        self.assertIn("**FLAGGED** 200 x3990, 503 x10", md)
        self.assertIn("1 row(s) flagged", md)
        self.assertIn("Development run on a busy machine", md)
        self.assertIn("load average 1.90 at start on 2 CPUs", md)
        ET.parse(self.path("docs/plot.svg"))

    def test_soak(self):
        samples = [{"t": t, "rss_kib": {"proxy": 20480 + (512 if t > 100 else 0)}} for t in range(0, 601, 60)]
        soak = dict(result(3000, 100, "proxy", requests=1800000), samples=samples, seconds=600.0)
        r, md = self.assemble_and_render(soak=soak)
        self.assertIn("## Soak", md)
        self.assertIn("| 600 | 1,800,000 | 3,000 | 20.0 / 20.0 / 20.5 / 20.5 | 0.50 | yes | ok |", md)
        self.assertIn("flat RSS over a 10-minute soak (growth after the first tenth) | 0.50 MiB | met", md)


if __name__ == "__main__":
    unittest.main()
