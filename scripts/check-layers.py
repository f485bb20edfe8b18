#!/usr/bin/env python3
"""Checks that the modules of src/ depend only downward (docs/architecture.md).

Every `crate::<module>` path in a non-test source file is an import of that top-level
module. Each module has a layer (LAYERS below); a module may import modules of lower
layers only, plus itself. Imports that break the rule today are listed, one
`importer -> imported` a line, in docs/layer-exceptions.txt: the check fails when a
new one appears, and when a listed one is gone (so the list only shrinks).

Usage: scripts/check-layers.py [--write]   (--write rewrites the exception list)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
EXCEPTIONS = ROOT / "docs" / "layer-exceptions.txt"

# Bottom to top. Same number: same layer (they may not import each other either).
LAYERS = {
    # 0: shared model, no I/O
    "fhir": 0,
    "fetch": 0,
    # 1: configuration types (validated into domain types)
    "config": 1,
    # 2: pure decision stages and the I/O adapters beside them
    "token": 2,
    "scope": 2,
    "authz": 2,
    "rewrite": 2,
    "cursor": 2,
    "audit": 2,
    "discovery": 2,
    "tenant": 2,
    "upstream": 2,
    # 3: the error classification, which wraps every stage's error
    "error": 3,
    # 4: the composition
    "stack": 4,
    "seed": 4,
    "server": 5,
    "lib": 6,
    "main": 6,
}

IMPORT = re.compile(r"\bcrate::([a-z_]+)")
TEST_FILE = re.compile(r"(^|/)tests\.rs$")


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).as_posix()
    return rel.split("/")[0].removesuffix(".rs")


def strip_tests(text: str) -> str:
    """The file without a trailing `#[cfg(test)] mod tests { ... }` block."""
    i = text.find("#[cfg(test)]\nmod tests {")
    return text if i < 0 else text[:i]


def violations() -> set[str]:
    found = set()
    for path in sorted(SRC.rglob("*.rs")):
        if TEST_FILE.search(path.as_posix()):
            continue
        importer = module_of(path)
        if importer not in LAYERS:
            sys.exit(f"check-layers: module `{importer}` ({path}) has no layer in {__file__}")
        for imported in set(IMPORT.findall(strip_tests(path.read_text()))):
            if imported == importer:
                continue
            if imported not in LAYERS:
                sys.exit(f"check-layers: `crate::{imported}` in {path} has no layer")
            if LAYERS[imported] >= LAYERS[importer]:
                found.add(f"{importer} -> {imported}")
    return found


def main() -> int:
    now = violations()
    if sys.argv[1:] == ["--write"]:
        EXCEPTIONS.write_text(
            "# Imports that break the layer order today (docs/architecture.md); "
            "scripts/check-layers.py\n# fails on any not listed here and on any "
            "listed one that is gone. Only remove lines.\n"
            + "".join(f"{v}\n" for v in sorted(now))
        )
        print(f"check-layers: wrote {len(now)} exceptions")
        return 0
    listed = {
        line.strip()
        for line in EXCEPTIONS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    new, gone = sorted(now - listed), sorted(listed - now)
    for v in new:
        print(f"check-layers: new upward or sideways import: {v}", file=sys.stderr)
    for v in gone:
        print(
            f"check-layers: `{v}` no longer occurs: remove it from {EXCEPTIONS.relative_to(ROOT)}",
            file=sys.stderr,
        )
    if new or gone:
        return 1
    print(f"check-layers: layer order holds ({len(listed)} known exceptions left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
