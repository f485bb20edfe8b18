"""scripts/check-threat-model.py on small made-up repositories: test references that
exist or not (Rust tests, ignored tests and plain functions, JSON cases, Python tests), gaps
and the Known gaps section, PENDING with and without --allow-pending. No cargo; well
under a second. Run: python3 -m unittest discover -s scripts/tests
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

    def check(self, text, allow_pending=False):
        problems, pending, _ = ctm.check(text, self.root, allow_pending)
        return problems, pending

    def assert_ok(self, text, allow_pending=False):
        problems, _ = self.check(text, allow_pending)
        self.assertEqual(problems, [])

    def assert_problem(self, text, needle, allow_pending=False):
        problems, _ = self.check(text, allow_pending)
        self.assertTrue(any(needle in p for p in problems), f"`{needle}` not in {problems}")

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
        self.assertEqual(run("--bogus").returncode, 64)


if __name__ == "__main__":
    unittest.main()
