#!/usr/bin/env python3
"""Checks that the threat model (docs/threat-model.md) names only tests that exist.

The threat tables are the Markdown tables whose header starts with `ID` and has a
`Tests` column. Each row is one threat: an id (`S1`, `T3`, ... : a STRIDE letter and a
number, unique in the document) and, in its Tests cell, items separated by `<br>` or
`;`, each one of:

- a test reference in backticks, `path::name`, relative to the repository root:
  for a `.rs` file, a `#[test]` or `#[tokio::test]` function `name` in that file (not
  `#[ignore]`d); for `tests/cases/*.json`, a case whose `description` is `name`; for a
  `.py` file, a `def name(` of a unittest method or function;
- a fuzz target in backticks, `fuzz/fuzz_targets/<target>.rs` (no `::`): the file
  exists and defines the target with `fuzz_target!`;
- `gap` (optionally followed by an explanation): the threat is not (fully) shown by a
  test. The row's id must then appear in the *Known gaps* section, and every id listed
  there must be a row marked `gap`;
- `PENDING: <what>`: a test that is being written. Any PENDING fails the check unless
  `--allow-pending` is given (then they are counted and listed);
- `PENDING-FUZZ:` and one `fuzz/fuzz_targets/<target>.rs` in backticks: a fuzz target
  that has not landed yet. It fails the check unless `--allow-pending` or
  `--allow-pending-fuzz` is given, and fails it in any case once that file exists
  (the item must then become the reference itself).

Every row needs at least one item. Exit status 0 when everything holds, 1 otherwise
(each problem printed on its own line), 64 for bad usage.

Usage: scripts/check-threat-model.py [--allow-pending] [--allow-pending-fuzz] [--root DIR] [FILE]
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DOC = pathlib.Path("docs") / "threat-model.md"

ID_RE = re.compile(r"^[STRIDE][0-9]+$")
REF_RE = re.compile(r"^(?P<path>[A-Za-z0-9_./-]+)::(?P<name>.+)$")
GAP_RE = re.compile(r"^gap\b", re.IGNORECASE)
PENDING_RE = re.compile(r"^PENDING:\s*\S")
FUZZ_PATH = r"fuzz/fuzz_targets/[A-Za-z0-9_-]+\.rs"
FUZZ_REF_RE = re.compile(r"^" + FUZZ_PATH + r"$")
PENDING_FUZZ_RE = re.compile(r"^PENDING-FUZZ:")
PENDING_FUZZ_ITEM_RE = re.compile(r"^PENDING-FUZZ:\s*`(?P<path>" + FUZZ_PATH + r")`\s*$")
FUZZ_TARGET_RE = re.compile(r"^\s*(libfuzzer_sys::)?fuzz_target!\s*\(", re.MULTILINE)
SEPARATOR_RE = re.compile(r"<br\s*/?>|;")
KNOWN_GAPS_RE = re.compile(r"^#{1,6}\s+Known gaps\s*$", re.IGNORECASE)
HEADING_RE = re.compile(r"^#{1,6}\s")
# A test attribute: #[test], #[tokio::test], #[tokio::test(flavor = ...)].
TEST_ATTR_RE = re.compile(r"^#\[(tokio::)?test(\(.*\))?\]$")


def split_row(line):
    """The cells of a Markdown table row (pipes inside backticks or escaped as `\\|`
    do not split)."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells, cell, in_code, i = [], [], False, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] == "|":
            cell.append("|")
            i += 2
            continue
        if c == "`":
            in_code = not in_code
        if c == "|" and not in_code:
            cells.append("".join(cell).strip())
            cell = []
        else:
            cell.append(c)
        i += 1
    cells.append("".join(cell).strip())
    return cells


def is_separator_row(cells):
    return all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c) and any(cells)


def threat_rows(lines):
    """(line number, id, tests cell) of every row of every threat table."""
    rows = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            header = [c.lower() for c in split_row(line)]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if (
                header
                and header[0] == "id"
                and "tests" in header
                and nxt.lstrip().startswith("|")
                and is_separator_row(split_row(nxt))
            ):
                tests_col = header.index("tests")
                i += 2
                while i < len(lines) and lines[i].lstrip().startswith("|"):
                    cells = split_row(lines[i])
                    threat_id = cells[0].strip("*` ")
                    tests = cells[tests_col] if tests_col < len(cells) else ""
                    rows.append((i + 1, threat_id, tests, len(cells), len(header)))
                    i += 1
                continue
        i += 1
    return rows


def split_items(cell):
    """Items of a Tests cell: separators outside backticks only."""
    items, cur, in_code, i = [], [], False, 0
    while i < len(cell):
        c = cell[i]
        if c == "`":
            in_code = not in_code
        if not in_code:
            m = SEPARATOR_RE.match(cell, i)
            if m:
                items.append("".join(cur).strip())
                cur = []
                i = m.end()
                continue
        cur.append(c)
        i += 1
    items.append("".join(cur).strip())
    return [x for x in items if x]


def known_gap_ids(lines):
    """Threat ids named in the Known gaps section (bold or plain, at the start of each
    list item)."""
    ids, inside, found = set(), False, False
    for line in lines:
        if KNOWN_GAPS_RE.match(line):
            inside, found = True, True
            continue
        if inside and HEADING_RE.match(line):
            inside = False
        if inside:
            m = re.match(r"^\s*[-*]\s+(.*)$", line)
            if m:
                head = re.match(r"^\**\s*([STRIDE][0-9]+(?:\s*,\s*[STRIDE][0-9]+)*)\s*\**", m.group(1))
                if head:
                    ids.update(x.strip() for x in head.group(1).split(","))
    return ids, found


def rust_test_exists(text, name):
    """Whether `text` has a test function `name`: an `fn name` with a test attribute
    among the attributes right above it, and no `#[ignore]`."""
    lines = text.splitlines()
    fn_re = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?fn\s+" + re.escape(name) + r"\s*[(<]")
    for i, line in enumerate(lines):
        if not fn_re.match(line):
            continue
        attrs = []
        j = i - 1
        while j >= 0:
            above = lines[j].strip()
            if above.startswith("#[") or above.startswith("///") or above.startswith("//"):
                attrs.append(above)
                j -= 1
                continue
            break
        is_test = any(TEST_ATTR_RE.match(a) for a in attrs)
        ignored = any(a.startswith("#[ignore") for a in attrs)
        if is_test and not ignored:
            return None
        if ignored:
            return "is #[ignore]d"
        return "is not a #[test] function"
    return "not found"


def check_ref(root, path, name, cache):
    """None when `path::name` names an existing test, else what is wrong."""
    file = root / path
    if not file.is_file():
        return f"no such file `{path}`"
    if file not in cache:
        cache[file] = file.read_text(encoding="utf-8")
    text = cache[file]
    if path.endswith(".rs"):
        problem = rust_test_exists(text, name)
        return None if problem is None else f"test `{name}` in `{path}`: {problem}"
    if path.endswith(".json") and pathlib.PurePosixPath(path).parent.as_posix() == "tests/cases":
        try:
            cases = json.loads(text)
        except ValueError as e:
            return f"`{path}` is not JSON: {e}"
        if not isinstance(cases, list):
            return f"`{path}` is not a list of cases"
        if any(isinstance(c, dict) and c.get("description") == name for c in cases):
            return None
        return f"no case with description `{name}` in `{path}`"
    if path.endswith(".py"):
        if re.search(r"^\s*def\s+" + re.escape(name) + r"\s*\(", text, re.MULTILINE):
            return None
        return f"no `def {name}` in `{path}`"
    return f"`{path}`: only .rs, tests/cases/*.json and .py files hold tests"


def check_fuzz_target(root, path, cache):
    """None when `path` (under fuzz/fuzz_targets/) is a fuzz target, else what is wrong."""
    file = root / path
    if not file.is_file():
        return f"no fuzz target `{path}`"
    if file not in cache:
        cache[file] = file.read_text(encoding="utf-8")
    if not FUZZ_TARGET_RE.search(cache[file]):
        return f"`{path}` defines no `fuzz_target!`"
    return None


def check(doc_text, root, allow_pending=False, allow_pending_fuzz=False):
    """Returns (problems, pending, summary) for the document text. `pending` lists
    PENDING and PENDING-FUZZ items alike."""
    lines = doc_text.splitlines()
    problems, pending, pending_fuzz = [], [], []
    rows = threat_rows(lines)
    if not rows:
        problems.append("no threat table found (a table with an `ID` and a `Tests` column)")
    gap_rows, seen, cache, refs = set(), {}, {}, 0
    for lineno, threat_id, cell, ncells, nheader in rows:
        where = f"line {lineno}"
        if ncells != nheader:
            problems.append(f"{where}: {ncells} cells, the header has {nheader}")
        if not ID_RE.match(threat_id):
            problems.append(f"{where}: `{threat_id}` is not a threat id (a STRIDE letter and a number)")
        elif threat_id in seen:
            problems.append(f"{where}: {threat_id} already used on line {seen[threat_id]}")
        else:
            seen[threat_id] = lineno
        items = split_items(cell)
        if not items:
            problems.append(f"{where}: {threat_id} has no test, no gap and no PENDING")
        for item in items:
            if item.startswith("`"):
                m = re.fullmatch(r"`([^`]+)`", item)
                if m and FUZZ_REF_RE.match(m.group(1)):
                    refs += 1
                    problem = check_fuzz_target(root, m.group(1), cache)
                    if problem:
                        problems.append(f"{where}: {threat_id}: {problem}")
                    continue
                ref = REF_RE.match(m.group(1)) if m else None
                if not ref:
                    problems.append(
                        f"{where}: {threat_id}: `{item}` is not one `path::test_name` "
                        "(or `fuzz/fuzz_targets/<target>.rs`) in backticks"
                    )
                    continue
                refs += 1
                problem = check_ref(root, ref.group("path"), ref.group("name"), cache)
                if problem:
                    problems.append(f"{where}: {threat_id}: {problem}")
            elif GAP_RE.match(item):
                gap_rows.add(threat_id)
            elif PENDING_FUZZ_RE.match(item):
                fm = PENDING_FUZZ_ITEM_RE.match(item)
                if not fm:
                    problems.append(
                        f"{where}: {threat_id}: `{item}` is not `PENDING-FUZZ: ` and one "
                        "`fuzz/fuzz_targets/<target>.rs` in backticks"
                    )
                elif (root / fm.group("path")).exists():
                    problems.append(
                        f"{where}: {threat_id}: `{fm.group('path')}` exists: "
                        "reference it instead of PENDING-FUZZ"
                    )
                else:
                    pending_fuzz.append(f"{where}: {threat_id}: {item}")
            elif PENDING_RE.match(item):
                pending.append(f"{where}: {threat_id}: {item}")
            else:
                problems.append(
                    f"{where}: {threat_id}: `{item}` is neither a test reference in backticks, `gap`, "
                    "`PENDING: ...` nor `PENDING-FUZZ: ...`"
                )
    listed, found = known_gap_ids(lines)
    if gap_rows and not found:
        problems.append("threats are marked `gap` but there is no `Known gaps` section")
    for threat_id in sorted(gap_rows - listed):
        problems.append(f"{threat_id} is marked `gap` but not listed under Known gaps")
    for threat_id in sorted(listed - gap_rows):
        if threat_id in seen:
            problems.append(f"{threat_id} is listed under Known gaps but its row is not marked `gap`")
        else:
            problems.append(f"{threat_id} is listed under Known gaps but has no row")
    if pending and not allow_pending:
        problems.extend(f"{p} (run with --allow-pending while it is being written)" for p in pending)
    if pending_fuzz and not (allow_pending or allow_pending_fuzz):
        problems.extend(
            f"{p} (run with --allow-pending-fuzz while the fuzz target is being written)" for p in pending_fuzz
        )
    summary = (
        f"{len(rows)} threats, {refs} test references, {len(gap_rows)} gaps, "
        f"{len(pending) + len(pending_fuzz)} pending ({len(pending_fuzz)} fuzz targets)"
    )
    return problems, pending + pending_fuzz, summary


def main(argv):
    allow_pending = False
    allow_pending_fuzz = False
    root = ROOT
    doc = None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--allow-pending":
            allow_pending = True
        elif a == "--allow-pending-fuzz":
            allow_pending_fuzz = True
        elif a == "--root" and args:
            root = pathlib.Path(args.pop(0)).resolve()
        elif a in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        elif a.startswith("-") or doc is not None:
            print(
                f"usage: {pathlib.Path(sys.argv[0]).name} [--allow-pending] [--allow-pending-fuzz] [--root DIR] [FILE]",
                file=sys.stderr,
            )
            return 64
        else:
            doc = pathlib.Path(a)
    if doc is None:
        doc = root / DEFAULT_DOC
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError as e:
        print(f"check-threat-model: cannot read {doc}: {e}", file=sys.stderr)
        return 1
    problems, pending, summary = check(text, root, allow_pending, allow_pending_fuzz)
    for p in problems:
        print(f"check-threat-model: {p}", file=sys.stderr)
    if allow_pending or allow_pending_fuzz:
        for p in pending:
            print(f"check-threat-model: pending: {p}")
    status = "FAILED" if problems else "ok"
    print(f"check-threat-model: {doc}: {summary}: {status}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
