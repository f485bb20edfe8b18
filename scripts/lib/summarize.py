"""Prints a one-line summary of a FHIR JSON answer (used by the demo tour)."""
import json
import sys

v = json.load(open(sys.argv[1]))
t = v.get("resourceType")
if t == "Bundle":
    ids = [e["resource"]["resourceType"] + "/" + e["resource"]["id"] for e in v.get("entry", [])]
    more = " ..." if len(ids) > 8 else ""
    print(f"Bundle with {len(ids)} entries: " + ", ".join(ids[:8]) + more)
    subjects = {
        e["resource"].get("subject", {}).get("reference")
        for e in v.get("entry", [])
        if e["resource"].get("subject", {}).get("reference")
    }
    if subjects:
        print(f"  subjects: {len(subjects)} distinct ({', '.join(sorted(subjects)[:5])}{' ...' if len(subjects) > 5 else ''})")
elif t == "OperationOutcome":
    issue = v["issue"][0]
    reason = issue["details"]["coding"][0]["code"]
    print(f"OperationOutcome: {issue['code']} / {reason}: {issue['diagnostics']}")
elif "capabilities" in v:
    print("issuer:      ", v["issuer"])
    print("capabilities:", " ".join(v["capabilities"]))
else:
    print(f"{t}/{v.get('id')}")
