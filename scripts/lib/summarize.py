"""Prints a one-line summary of a FHIR JSON answer (used by the demo tour)."""
import json
import sys

v = json.load(open(sys.argv[1]))
t = v.get("resourceType")
if t == "Bundle" and v.get("type", "").endswith("-response"):
    print(f"{v['type']} with {len(v.get('entry', []))} entries:")
    for n, e in enumerate(v.get("entry", []), 1):
        r = e.get("response", {})
        what = ""
        if "resource" in e:
            res = e["resource"]
            what = f"{res.get('resourceType')}/{res.get('id', '')}"
            if res.get("resourceType") == "Bundle":
                what = f"Bundle with {len(res.get('entry', []))} entries"
        elif "location" in r:
            what = "location " + r["location"]
        elif "outcome" in r:
            what = "OperationOutcome " + r["outcome"]["issue"][0]["details"]["coding"][0]["code"]
        print(f"  {n}. {r.get('status', '?')}  {what}")
elif t == "Bundle":
    ids = [e["resource"]["resourceType"] + "/" + e["resource"].get("id", "?") for e in v.get("entry", []) if "resource" in e]
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
