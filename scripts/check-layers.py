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
# The stages are sub-layers in request order: a stage may import what earlier stages
# write (their extension and error types), never what a later one does.
LAYERS = {
    # 0: shared model, no I/O: FHIR types, parsed and outbound request, compartment
    # and search-parameter definitions, OperationOutcome; the stage trait and its
    # extension helpers; the capped control-plane reader
    "fhir": 0,
    "fetch": 0,
    "pipeline": 0,
    # the process-wide metrics registry and the request trace context (W3C Trace
    # Context, request ids, the span exporter): every stage records into them
    "metrics": 0,
    "trace": 0,
    # TLS material: PEM files, client TLS configurations (private CA, client certs)
    "tls": 0,
    # 1: configuration types (validated into domain types); the SMART scope grammar
    "config": 1,
    "smart": 1,
    # 2: the audit sink every stage writes to; the resolved tenant (stage 0's model)
    "audit": 2,
    "tenant": 2,
    # the CORS decisions (pure; applied by the stack's outermost layer)
    "cors": 2,
    # 3: the upstream FHIR client (I/O adapter used by discovery, authz and forward)
    "upstream": 3,
    # 4..8: the stages, in request order
    "discovery": 4,
    "token": 4,
    "scope": 5,
    "limits": 5,
    "authz": 6,
    "cursor": 6,
    "rewrite": 7,
    "forward": 8,
    # 9: the error classification, which wraps every stage's error
    "error": 9,
    # 10..11: the composition: tenant registry and stage 0, the stack
    "registry": 10,
    "stack": 11,
    "seed": 11,
    # the fixtures of the fuzz targets (feature `fuzzing`): the stages run in order
    "fuzzing": 11,
    # the outermost wrapper of a request: trace scope, request span, request metrics
    "observe": 11,
    "server": 12,
    # the admin listener: /metrics, /healthz, /readyz
    "admin": 12,
    "lib": 13,
    "main": 13,
}

IMPORT = re.compile(r"\bcrate::([a-z_]+)")
GROUP = re.compile(r"\bcrate::\{")
TEST_FILE = re.compile(r"(^|/)tests\.rs$")


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).as_posix()
    return rel.split("/")[0].removesuffix(".rs")


def strip_tests(text: str) -> str:
    """The file without a trailing `#[cfg(test)] mod tests { ... }` block."""
    i = text.find("#[cfg(test)]\nmod tests {")
    return text if i < 0 else text[:i]


def imports(text: str) -> set[str]:
    """The top-level modules a source text names as `crate::<module>`, including the
    ones inside a grouped `use crate::{a::X, b};`."""
    found = set(IMPORT.findall(text))
    for m in GROUP.finditer(text):
        depth, i, start, items = 1, m.end(), m.end(), []
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            if (c == "," and depth == 1) or depth == 0:
                items.append(text[start:i])
                start = i + 1
            i += 1
        for item in items:
            name = re.match(r"\s*([a-z_]+)", item)
            if name and name.group(1) != "self":
                found.add(name.group(1))
    return found


def violations() -> set[str]:
    found = set()
    for path in sorted(SRC.rglob("*.rs")):
        if TEST_FILE.search(path.as_posix()):
            continue
        importer = module_of(path)
        if importer not in LAYERS:
            sys.exit(f"check-layers: module `{importer}` ({path}) has no layer in {__file__}")
        for imported in imports(strip_tests(path.read_text())):
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
