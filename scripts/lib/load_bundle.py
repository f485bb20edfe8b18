#!/usr/bin/env python3
"""Load FHIR transaction/batch Bundles into a FHIR server.

Usage: load_bundle.py BASE_URL FILE [FILE...] [--put-ids] [--placeholder-base=URL]

- The text `__FHIR_BASE__` in a file is replaced by BASE_URL (or by the URL given with
  --placeholder-base) before loading, so a fixture can hold absolute references to the
  server it is loaded into.
- --put-ids turns `POST Type` entries whose fullUrl is `urn:uuid:X` into `PUT Type/X`,
  so generated data keeps stable ids across loads (the server would mint random ones).
- Every entry must succeed: a batch entry with a non-2xx status fails the load.
Uses only the Python standard modules.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

PLACEHOLDER = "__FHIR_BASE__"


def put_ids(bundle: dict) -> None:
    for entry in bundle.get("entry", []):
        req = entry.get("request") or {}
        full = entry.get("fullUrl") or ""
        res = entry.get("resource") or {}
        if req.get("method") == "POST" and full.startswith("urn:uuid:") and "/" not in req.get("url", "/"):
            rid = full[len("urn:uuid:"):]
            res["id"] = rid
            entry["request"] = {"method": "PUT", "url": f"{res.get('resourceType', req['url'])}/{rid}"}


def post(base: str, bundle: dict) -> dict:
    data = json.dumps(bundle).encode()
    req = urllib.request.Request(base, data=data, method="POST", headers={
        "Content-Type": "application/fhir+json", "Accept": "application/fhir+json", "Prefer": "return=minimal"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        sys.exit(f"load_bundle.py: POST {base} answered {e.code}: {body[:2000]}")


def main(argv: list[str]) -> int:
    flags = {a.split("=", 1)[0]: a.partition("=")[2] for a in argv if a.startswith("--")}
    args = [a for a in argv if not a.startswith("--")]
    unknown = set(flags) - {"--put-ids", "--placeholder-base"}
    if unknown or len(args) < 2:
        sys.exit("usage: load_bundle.py BASE_URL FILE [FILE...] [--put-ids] [--placeholder-base=URL]")
    base, files = args[0].rstrip("/"), args[1:]
    placeholder_base = (flags.get("--placeholder-base") or base).rstrip("/")
    for path in files:
        with open(path, encoding="utf-8") as f:
            bundle = json.loads(f.read().replace(PLACEHOLDER, placeholder_base))
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
            sys.exit(f"load_bundle.py: {path}: not a batch or transaction Bundle")
        if "--put-ids" in flags:
            put_ids(bundle)
        out = post(base, bundle)
        failed = [(i, e.get("response", {})) for i, e in enumerate(out.get("entry", []))
                  if not str(e.get("response", {}).get("status", "")).startswith("2")]
        if failed:
            for i, r in failed[:10]:
                req = bundle["entry"][i].get("request", {})
                print(f"load_bundle.py: {path}: entry {i} {req.get('method')} {req.get('url')}: "
                      f"{r.get('status')} {json.dumps(r.get('outcome', {}))[:500]}", file=sys.stderr)
            return 1
        print(f"load_bundle.py: {path}: {len(bundle.get('entry', []))} entries loaded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
