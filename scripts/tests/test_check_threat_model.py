"""scripts/check-threat-model.py on small made-up repositories: test references that
exist or not (Rust tests, ignored tests and plain functions, JSON cases, Python tests, fuzz
targets), gaps and the Known gaps section, PENDING and PENDING-FUZZ with and without
--allow-pending and --allow-pending-fuzz. No cargo; well under a second. Run:
python3 -m unittest discover -s scripts/tests
"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import unittest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "check-threat-model.py"
_spec = importlib.util.spec_from_file_location("check_threat_model", SCRIPT)
ctm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ctm)

RUST = """\
#[test]
fn plain_test() {}

#[tokio::test]
async fn async_test() {}

/// A documented one.
#[tokio::test(flavor = "multi_thread")]
async fn documented_test() {}

#[test]
#[ignore]
fn ignored_test() {}

fn not_a_test() {}

proptest! {
    #[test]
    fn property(s in any::<String>()) {}
}
"""

CASES = [
    {"description": "p1 cannot read p2's glucose", "client": "patient-p1"},
    {"description": "encoded slash: Patient%2Fp2 is refused", "client": "patient-p1"},
]

FUZZ_TARGET = """\
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = data;
});
"""

PYTHON = """\
import unittest
class T(unittest.TestCase):
    def test_something(self):
        pass
"""


def table(*rows):
    head = "| ID | Threat | Mitigation | Tests |\n| --- | --- | --- | --- |\n"
    return head + "".join(f"| {i} | threat | mitigation | {t} |\n" for i, t in rows)


def doc(*rows, gaps=()):
    text = "# Threat model\n\n## Flow\n\n" + table(*rows)
    if gaps is not None:
        text += "\n## Known gaps\n\n" + "".join(f"- **{g}** what is missing.\n" for g in gaps)
    text += "\n## After\n\n- **S9** not a gap entry: another section.\n"
    return text


class CheckThreatModel(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = pathlib.Path(tmp.name)
        (self.root / "src").mkdir()
        (self.root / "src" / "lib.rs").write_text(RUST)
        (self.root / "tests" / "cases").mkdir(parents=True)
        (self.root / "tests" / "cases" / "reads.json").write_text(json.dumps(CASES))
        (self.root / "tests" / "fixtures.json").write_text(json.dumps(CASES))
        (self.root / "scripts" / "tests").mkdir(parents=True)
        (self.root / "scripts" / "tests" / "test_x.py").write_text(PYTHON)

    def check(self, text, allow_pending=False, allow_pending_fuzz=False):
        problems, pending, _ = ctm.check(text, self.root, allow_pending, allow_pending_fuzz)
        return problems, pending

    def assert_ok(self, text, allow_pending=False, allow_pending_fuzz=False):
        problems, _ = self.check(text, allow_pending, allow_pending_fuzz)
        self.assertEqual(problems, [])

    def assert_problem(self, text, needle, allow_pending=False, allow_pending_fuzz=False):
        problems, _ = self.check(text, allow_pending, allow_pending_fuzz)
        self.assertTrue(any(needle in p for p in problems), f"`{needle}` not in {problems}")

    def add_fuzz_target(self, name, text=FUZZ_TARGET):
        targets = self.root / "fuzz" / "fuzz_targets"
        targets.mkdir(parents=True, exist_ok=True)
        (targets / f"{name}.rs").write_text(text)

    def test_existing_references_of_every_kind_pass(self):
        self.assert_ok(
            doc(
                ("S1", "`src/lib.rs::plain_test`<br>`src/lib.rs::async_test`"),
                ("T1", "`src/lib.rs::documented_test`; `src/lib.rs::property`"),
                ("I1", "`tests/cases/reads.json::encoded slash: Patient%2Fp2 is refused`"),
                ("D1", "`scripts/tests/test_x.py::test_something`"),
                ("**E1**", "`tests/cases/reads.json::p1 cannot read p2's glucose`"),
            )
        )

    def test_missing_file_and_missing_function_fail(self):
        self.assert_problem(doc(("S1", "`src/nope.rs::plain_test`")), "no such file `src/nope.rs`")
        self.assert_problem(doc(("S1", "`src/lib.rs::no_such_test`")), "`no_such_test` in `src/lib.rs`: not found")

    def test_plain_functions_and_ignored_tests_do_not_count(self):
        self.assert_problem(doc(("S1", "`src/lib.rs::not_a_test`")), "is not a #[test] function")
        self.assert_problem(doc(("S1", "`src/lib.rs::ignored_test`")), "is #[ignore]d")

    def test_json_cases_are_found_by_description_in_tests_cases_only(self):
        self.assert_problem(
            doc(("I1", "`tests/cases/reads.json::p1 cannot read p3's glucose`")),
            "no case with description",
        )
        self.assert_problem(
            doc(("I1", "`tests/fixtures.json::p1 cannot read p2's glucose`")),
            "only .rs, tests/cases/*.json and .py files",
        )

    def test_python_tests_must_exist(self):
        self.assert_problem(doc(("D1", "`scripts/tests/test_x.py::test_other`")), "no `def test_other`")

    def test_a_row_needs_a_test_a_gap_or_a_pending(self):
        self.assert_problem(doc(("S1", "")), "S1 has no test, no gap and no PENDING")
        self.assert_problem(doc(("S1", "src/lib.rs::plain_test")), "is neither a test reference")
        self.assert_problem(doc(("S1", "`not a reference`")), "is not one `path::test_name`")

    def test_gaps_must_be_listed_under_known_gaps_and_only_gaps(self):
        self.assert_ok(doc(("S1", "`src/lib.rs::plain_test`<br>gap: only half of it"), gaps=("S1",)))
        self.assert_ok(doc(("S1", "gap"), ("S2", "Gap: none"), gaps=("S1", "S2")))
        self.assert_problem(doc(("S1", "gap: untested")), "S1 is marked `gap` but not listed under Known gaps")
        self.assert_problem(doc(("S1", "gap"), gaps=None), "there is no `Known gaps` section")
        self.assert_problem(
            doc(("S1", "gap"), ("T1", "`src/lib.rs::plain_test`"), gaps=("S1", "T1")),
            "T1 is listed under Known gaps but its row is not marked `gap`",
        )
        self.assert_problem(doc(("S1", "gap"), gaps=("S1", "R7")), "R7 is listed under Known gaps but has no row")

    def test_pending_fails_unless_allowed(self):
        text = doc(("T4", "PENDING: adversarial e2e suite, request smuggling"))
        self.assert_problem(text, "PENDING: adversarial e2e suite")
        problems, pending = self.check(text, allow_pending=True)
        self.assertEqual(problems, [])
        self.assertEqual(len(pending), 1)
        # Allowed pending items do not excuse broken references next to them.
        self.assert_problem(
            doc(("T4", "PENDING: later<br>`src/lib.rs::gone`")), "`gone` in `src/lib.rs`", allow_pending=True
        )

    def test_fuzz_targets_are_valid_references_when_they_exist(self):
        text = doc(("D4", "`src/lib.rs::plain_test`<br>`fuzz/fuzz_targets/scope.rs`"))
        # Before the fuzz crate exists, and with another target only.
        self.assert_problem(text, "no fuzz target `fuzz/fuzz_targets/scope.rs`")
        self.add_fuzz_target("request")
        self.assert_problem(text, "no fuzz target `fuzz/fuzz_targets/scope.rs`")
        self.add_fuzz_target("scope")
        self.assert_ok(text)
        _, _, summary = ctm.check(text, self.root)
        self.assertIn("2 test references", summary)
        # A file there that defines no target does not count.
        self.add_fuzz_target("helpers", "pub fn shared() {}\n// fuzz_target! is in the others\n")
        self.assert_problem(
            doc(("D4", "`fuzz/fuzz_targets/helpers.rs`")), "`fuzz/fuzz_targets/helpers.rs` defines no `fuzz_target!`"
        )
        # Only files directly under fuzz/fuzz_targets/ are fuzz references.
        self.assert_problem(doc(("D4", "`fuzz/scope.rs`")), "is not one `path::test_name`")

    def test_pending_fuzz_fails_unless_allowed_and_once_the_target_exists(self):
        text = doc(("D4", "`src/lib.rs::plain_test`<br>PENDING-FUZZ: `fuzz/fuzz_targets/scope.rs`"))
        self.assert_problem(text, "PENDING-FUZZ: `fuzz/fuzz_targets/scope.rs` (run with --allow-pending-fuzz")
        problems, pending = self.check(text, allow_pending_fuzz=True)
        self.assertEqual(problems, [])
        self.assertEqual(len(pending), 1)
        self.assert_ok(text, allow_pending=True)
        # --allow-pending-fuzz excuses fuzz targets only.
        self.assert_problem(
            doc(("D4", "PENDING-FUZZ: `fuzz/fuzz_targets/scope.rs`"), ("T4", "PENDING: smuggling")),
            "PENDING: smuggling (run with --allow-pending",
            allow_pending_fuzz=True,
        )
        # It names exactly one target in backticks.
        for bad in ("PENDING-FUZZ: scope parser", "PENDING-FUZZ: `src/lib.rs::plain_test`", "PENDING-FUZZ:"):
            self.assert_problem(doc(("D4", bad)), "is not `PENDING-FUZZ: ` and one", allow_pending=True)
        # Once the target has landed the item must become the reference.
        self.add_fuzz_target("scope")
        self.assert_problem(
            text, "`fuzz/fuzz_targets/scope.rs` exists: reference it instead of PENDING-FUZZ", allow_pending=True
        )

    def test_ids_are_stride_letters_and_unique(self):
        self.assert_problem(doc(("X1", "`src/lib.rs::plain_test`")), "`X1` is not a threat id")
        self.assert_problem(
            doc(("S1", "`src/lib.rs::plain_test`"), ("S1", "`src/lib.rs::async_test`")), "S1 already used"
        )

    def test_backticks_and_escaped_pipes_do_not_split_cells(self):
        text = "| ID | Threat | Mitigation | Tests |\n| --- | --- | --- | --- |\n"
        text += "| S1 | a `a|b` threat | `x \\| y` | `src/lib.rs::plain_test` |\n"
        self.assert_ok(text)

    def test_a_document_without_threat_tables_fails(self):
        self.assert_problem("# Nothing here\n\n| a | b |\n| - | - |\n", "no threat table found")

    def test_command_line_exit_status(self):
        good = self.root / "good.md"
        good.write_text(doc(("S1", "`src/lib.rs::plain_test`")))
        pending = self.root / "pending.md"
        pending.write_text(doc(("S1", "PENDING: soon")))
        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, str(SCRIPT), "--root", str(self.root), *a], capture_output=True, text=True
        )
        self.assertEqual(run(str(good)).returncode, 0)
        r = run(str(pending))
        self.assertEqual(r.returncode, 1)
        self.assertIn("--allow-pending", r.stderr)
        self.assertEqual(run("--allow-pending", str(pending)).returncode, 0)
        self.assertEqual(run("--allow-pending-fuzz", str(pending)).returncode, 1)
        fuzz = self.root / "fuzz.md"
        fuzz.write_text(doc(("D4", "PENDING-FUZZ: `fuzz/fuzz_targets/scope.rs`")))
        self.assertEqual(run(str(fuzz)).returncode, 1)
        r = run("--allow-pending-fuzz", str(fuzz))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 pending (1 fuzz targets)", r.stdout)
        self.assertEqual(run("--bogus").returncode, 64)


if __name__ == "__main__":
    unittest.main()
