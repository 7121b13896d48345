#!/usr/bin/env python3
"""Validate rxflow's AuditEvent NDJSON export against the FHIR R4 model of `fhir.resources`.

Usage: fhir_auditevent_check.py <file.ndjson>

Exit 0: every line is a valid R4 AuditEvent with the codes rxflow promises.
Exit 1: a line failed (line number and reason printed; no event content is printed).
Exit 3: the `fhir.resources` package is missing (callers skip the check).

`fhir.resources` checks structure and types, not code values, so the codes are checked here.
"""
import json
import sys

try:
    from fhir.resources.R4B.auditevent import AuditEvent
except ImportError:
    print("fhir.resources is not installed: pip install fhir.resources", file=sys.stderr)
    sys.exit(3)

ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
PURPOSES = {"TREAT", "HPAYMT", "HOPERAT", "ETREAT", "HSYSADMIN"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def check_codes(obj):
    if obj.get("action") not in ACTIONS:
        return "action is not one of C R U D E"
    if obj.get("outcome") not in OUTCOMES:
        return "outcome is not one of 0 4 8 12"
    if obj["type"].get("system") != DCM:
        return "type is not a DICOM code"
    for purpose in obj.get("purposeOfEvent", []):
        for coding in purpose.get("coding", []):
            if coding.get("code") not in PURPOSES:
                return "purposeOfEvent has an unknown v3 PurposeOfUse code"
    if not obj.get("agent") or obj["agent"][0].get("requestor") is not True:
        return "first agent must be the requestor"
    return None


def main(path):
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                AuditEvent.model_validate(obj)
            except Exception as e:  # pydantic ValidationError or JSON error
                kind = type(e).__name__
                # Summary and field path only: the offending input value is not echoed.
                where = " / ".join(str(e).splitlines()[:2])
                print(f"line {number}: not a valid R4 AuditEvent ({kind}: {where})", file=sys.stderr)
                return 1
            problem = check_codes(obj)
            if problem:
                print(f"line {number}: {problem}", file=sys.stderr)
                return 1
            count += 1
    if count == 0:
        print("no AuditEvent lines found", file=sys.stderr)
        return 1
    print(f"{count} AuditEvent resources valid")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
