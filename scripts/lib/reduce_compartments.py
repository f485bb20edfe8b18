#!/usr/bin/env python3
"""Writes compartments/ from an unpacked hl7.fhir.r4.examples package.

Usage: reduce_compartments.py PACKAGE_DIR OUT_DIR

- compartmentdefinition-{patient,encounter,relatedperson,practitioner,device}.json:
  the official resources without their XHTML narrative (`text`), one `resource`
  entry per line.
- search-parameters.json: the SearchParameters those definitions name in
  `resource[].param` (matched on code and base), reduced to id, url, code, base,
  type, expression, target; one per line, sorted by id. `{def}` (the compartment's
  own resource) is not a search parameter and has no entry.
- search-parameters-all.json: every non-experimental SearchParameter of the package
  (the R4 core parameters, without the package's example and experimental extension
  ones), reduced to code, base, type, expression, target; one minified object per
  line, sorted by id. The proxy evaluates scope constraints (`?category=...`) with it.
Uses only the Python standard modules.
"""
from __future__ import annotations

import glob
import json
import os
import sys

COMPARTMENTS = ["patient", "encounter", "relatedPerson", "practitioner", "device"]
KEEP = ["id", "url", "code", "base", "type", "expression", "target"]
KEEP_ALL = ["code", "base", "type", "expression", "target"]


def dump_compartment(cd: dict) -> str:
    head = {k: v for k, v in cd.items() if k not in ("text", "resource")}
    lines = json.dumps(head, indent=2, ensure_ascii=False).rstrip("}").rstrip().rstrip(",")
    entries = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in cd["resource"])
    return f'{lines},\n  "resource": [\n{entries}\n  ]\n}}\n'


def write_all_search_parameters(pkg: str, out: str) -> None:
    """search-parameters-all.json: the core SearchParameters, compact, one per line."""
    core: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(pkg, "SearchParameter-*.json"))):
        with open(path, encoding="utf-8") as f:
            sp = json.load(f)
        # The examples package also carries example SearchParameters (`example`,
        # `example-reference`, ... which redefine `_id` and `Condition.subject`) and
        # experimental extension ones: all marked experimental, none part of the core.
        if sp.get("experimental") or not sp.get("base"):
            continue
        core[sp["id"]] = {k: sp[k] for k in KEEP_ALL if k in sp}
    rows = ",\n".join(json.dumps(core[i], ensure_ascii=False, separators=(",", ":")) for i in sorted(core))
    with open(os.path.join(out, "search-parameters-all.json"), "w", encoding="utf-8") as f:
        f.write(f"[\n{rows}\n]\n")
    print(f"reduce_compartments.py: {len(core)} SearchParameters in search-parameters-all.json", file=sys.stderr)


def main(pkg: str, out: str) -> int:
    by_code_base: dict[tuple[str, str], dict] = {}
    for path in sorted(glob.glob(os.path.join(pkg, "SearchParameter-*.json"))):
        with open(path, encoding="utf-8") as f:
            sp = json.load(f)
        for base in sp.get("base", []):
            by_code_base.setdefault((base, sp["code"]), sp)
    used: dict[str, dict] = {}
    for name in COMPARTMENTS:
        with open(os.path.join(pkg, f"CompartmentDefinition-{name}.json"), encoding="utf-8") as f:
            cd = json.load(f)
        for r in cd["resource"]:
            for param in r.get("param", []):
                if param == "{def}":
                    continue
                sp = by_code_base.get((r["code"], param))
                if sp is None:
                    sys.exit(f"reduce_compartments.py: no SearchParameter {r['code']}.{param}")
                used[sp["id"]] = {k: sp[k] for k in KEEP if k in sp}
        with open(os.path.join(out, f"compartmentdefinition-{name.lower()}.json"), "w", encoding="utf-8") as f:
            f.write(dump_compartment(cd))
    rows = ",\n".join("  " + json.dumps(used[i], ensure_ascii=False) for i in sorted(used))
    with open(os.path.join(out, "search-parameters.json"), "w", encoding="utf-8") as f:
        f.write(f"[\n{rows}\n]\n")
    print(f"reduce_compartments.py: {len(COMPARTMENTS)} CompartmentDefinitions, {len(used)} SearchParameters",
          file=sys.stderr)
    write_all_search_parameters(pkg, out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: reduce_compartments.py PACKAGE_DIR OUT_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))
