"""The supply-chain check: the policy in deny.toml, and scripts/check-supply-chain.sh
choosing what to check with a stand-in `cargo` and `git` on PATH (no network, no real
cargo-deny; the real one runs in scripts/test.sh). About a second.
Run: python3 -m unittest discover -s scripts/tests
"""

import os
import pathlib
import re
import subprocess
import tempfile
import tomllib
import unittest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "check-supply-chain.sh"
DENY_TOML = ROOT / "deny.toml"

# Permissive licences that may ship inside an Apache-2.0 / MIT binary.
PERMISSIVE = {
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "MIT",
    "MIT-0",
    "ISC",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "Zlib",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "BSL-1.0",
    "CC0-1.0",
    "Unlicense",
}


def pinned_version():
    text = (ROOT / "scripts" / "lib" / "common.sh").read_text()
    m = re.search(r"^CARGO_DENY_VERSION=(\S+)$", text, re.MULTILINE)
    assert m, "CARGO_DENY_VERSION not set in scripts/lib/common.sh"
    return m.group(1)


# `cargo`: answers `cargo deny --version` with $STUB_VERSION, records every other
# call (one line of arguments each) in $STUB_LOG, copies a `--config` file to
# $STUB_LOG.config, and exits with $STUB_STATUS.
CARGO_STUB = r"""#!/usr/bin/env bash
if [[ $1 == deny && $2 == --version ]]; then echo "cargo-deny $STUB_VERSION"; exit 0; fi
echo "cargo $*" >>"$STUB_LOG"
prev=
for a in "$@"; do
  [[ $prev == --config ]] && cp "$a" "$STUB_LOG.config"
  prev=$a
done
echo "stub cargo-deny output"
exit "${STUB_STATUS:-0}"
"""

# `git`: records the call and exits with $STUB_GIT_STATUS (128: cannot reach the host).
GIT_STUB = r"""#!/usr/bin/env bash
echo "git $*" >>"$STUB_LOG"
exit "${STUB_GIT_STATUS:-128}"
"""


class Run:
    def __init__(self, proc, log_path):
        self.status = proc.returncode
        self.output = proc.stdout + proc.stderr
        self.calls = log_path.read_text().splitlines() if log_path.exists() else []
        config = pathlib.Path(str(log_path) + ".config")
        self.config = config.read_text() if config.exists() else None

    def cargo_calls(self):
        return [c for c in self.calls if c.startswith("cargo ")]

    def git_calls(self):
        return [c for c in self.calls if c.startswith("git ")]


class CheckSupplyChainScript(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.bin = pathlib.Path(self.tmp.name) / "bin"
        self.bin.mkdir()
        for name, text in (("cargo", CARGO_STUB), ("git", GIT_STUB)):
            p = self.bin / name
            p.write_text(text)
            p.chmod(0o755)
        self.log = pathlib.Path(self.tmp.name) / "calls.log"

    def run_script(self, **env):
        e = {k: v for k, v in os.environ.items() if k != "CARGO_DENY_ADVISORY_DB"}
        e["PATH"] = f"{self.bin}{os.pathsep}{e.get('PATH', '')}"
        e["STUB_LOG"] = str(self.log)
        e.setdefault("STUB_VERSION", pinned_version())
        e.update(env)
        proc = subprocess.run(
            [str(SCRIPT)], env=e, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        return Run(proc, self.log)

    def test_unreachable_database_skips_advisories_loudly_and_checks_the_rest(self):
        r = self.run_script(STUB_GIT_STATUS="128")
        self.assertEqual(r.status, 0, r.output)
        self.assertIn("ADVISORIES SKIPPED", r.output)
        self.assertIn("NOT checked for known vulnerabilities", r.output)
        self.assertEqual(r.cargo_calls(), ["cargo deny --locked check licenses bans sources"])
        self.assertEqual(len(r.git_calls()), 1, r.calls)
        self.assertIn("ls-remote", r.git_calls()[0])
        self.assertIn("supply chain ok", r.output)

    def test_reachable_database_is_checked_for_real(self):
        r = self.run_script(STUB_GIT_STATUS="0")
        self.assertEqual(r.status, 0, r.output)
        self.assertNotIn("SKIPPED", r.output)
        # Every check, the advisories (fetched) included.
        self.assertEqual(r.cargo_calls(), ["cargo deny --locked check"])

    def test_local_database_is_checked_offline(self):
        db = pathlib.Path(self.tmp.name) / "advisory-dbs"
        db.mkdir()
        r = self.run_script(CARGO_DENY_ADVISORY_DB=str(db), STUB_GIT_STATUS="0")
        self.assertEqual(r.status, 0, r.output)
        self.assertNotIn("SKIPPED", r.output)
        self.assertEqual(r.git_calls(), [], "a local database needs no network")
        fetch, call = r.cargo_calls()
        self.assertEqual(fetch, "cargo fetch --locked --quiet")
        self.assertRegex(call, r"^cargo deny --locked --offline --config \S+ check$")
        # The config handed to cargo-deny is deny.toml with the database directory set.
        self.assertIsNotNone(r.config)
        cfg = tomllib.loads(r.config)
        self.assertEqual(cfg["advisories"]["db-path"], str(db.resolve()))
        want = tomllib.loads(DENY_TOML.read_text())
        want["advisories"]["db-path"] = str(db.resolve())
        self.assertEqual(cfg, want)

    def test_a_missing_local_database_is_an_error(self):
        r = self.run_script(CARGO_DENY_ADVISORY_DB=str(pathlib.Path(self.tmp.name) / "nope"))
        self.assertNotEqual(r.status, 0, r.output)
        self.assertIn("CARGO_DENY_ADVISORY_DB", r.output)
        self.assertEqual(r.cargo_calls(), [])

    def test_a_failing_check_fails_the_script(self):
        for git_status in ("0", "128"):
            with self.subTest(database_reachable=git_status == "0"):
                self.log.unlink(missing_ok=True)
                r = self.run_script(STUB_GIT_STATUS=git_status, STUB_STATUS="2")
                self.assertEqual(r.status, 2, r.output)
                self.assertIn("supply chain check FAILED", r.output)
                self.assertNotIn("supply chain ok", r.output)

    def test_another_cargo_deny_version_is_refused(self):
        r = self.run_script(STUB_VERSION="0.0.1")
        self.assertNotEqual(r.status, 0, r.output)
        self.assertIn(f"cargo-deny {pinned_version()} is required", r.output)
        self.assertIn("scripts/install.sh", r.output)
        self.assertEqual(r.cargo_calls(), [])


class DenyToml(unittest.TestCase):
    def setUp(self):
        self.cfg = tomllib.loads(DENY_TOML.read_text())

    def test_sources_are_crates_io_only(self):
        s = self.cfg["sources"]
        self.assertEqual(s["unknown-registry"], "deny")
        self.assertEqual(s["unknown-git"], "deny")
        self.assertEqual(s["allow-registry"], ["https://github.com/rust-lang/crates.io-index"])
        self.assertEqual(s.get("allow-git", []), [])
        self.assertFalse(s.get("allow-org", {}).get("github"))

    def test_licences_are_an_allow_list(self):
        lic = self.cfg["licenses"]
        self.assertTrue(lic["allow"], "no licence allowed")
        self.assertLessEqual(set(lic["allow"]), PERMISSIVE, "a licence that is not permissive")
        self.assertEqual(lic.get("exceptions", []), [])
        self.assertGreaterEqual(lic.get("confidence-threshold", 0.8), 0.8)

    def test_advisories_fail_on_vulnerabilities_and_warn_on_yanked(self):
        adv = self.cfg["advisories"]
        self.assertEqual(adv["yanked"], "warn")
        self.assertEqual(adv.get("ignore", []), [])
        # The script sets the database directory itself.
        self.assertNotIn("db-path", adv)
        self.assertEqual(DENY_TOML.read_text().count("[advisories]"), 1)

    def test_duplicate_versions_are_warned(self):
        self.assertEqual(self.cfg["bans"]["multiple-versions"], "warn")

    def test_the_check_runs_in_ci_with_the_pinned_cargo_deny(self):
        test_sh = (ROOT / "scripts" / "test.sh").read_text()
        self.assertRegex(test_sh, r"(?m)^scripts/check-supply-chain\.sh$")
        install = (ROOT / "scripts" / "install.sh").read_text()
        self.assertIn('--locked --quiet cargo-deny --version "$CARGO_DENY_VERSION"', install)


if __name__ == "__main__":
    unittest.main()
