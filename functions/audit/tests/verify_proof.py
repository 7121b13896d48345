#!/usr/bin/env python3
"""Check an rxflow inclusion proof with nothing but the public key, following docs/audit-trail.md.

Independent of the Rust code: hashlib for SHA-256, the `cryptography` package for Ed25519.

    verify_proof.py PROOF.json PUBLIC_KEY_FILE     (the keys/audit-signing.pub file, or 64 hex digits)

Exit 0 when the proof verifies, 1 (with the reason) when it does not, 2 when it cannot run.
"""

import base64
import hashlib
import json
import sys

try:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.exceptions import InvalidSignature
except ImportError:
    print("needs the cryptography package: pip install cryptography", file=sys.stderr)
    sys.exit(2)

SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def public_key(text: str) -> bytes:
    if "-----BEGIN PUBLIC KEY-----" in text:
        b64 = text.split("-----BEGIN PUBLIC KEY-----")[1].split("-----END PUBLIC KEY-----")[0]
        der = base64.b64decode("".join(b64.split()))
        assert der.startswith(SPKI_PREFIX) and len(der) == 44, "not an Ed25519 SPKI"
        return der[len(SPKI_PREFIX):]
    return bytes.fromhex(text.strip())


def verify_path(index: int, size: int, leaf: bytes, path: list, root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = sha256(b"\x01", p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01", r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def fail(why: str):
    print(f"proof does not verify: {why}")
    sys.exit(1)


def main():
    proof = json.load(open(sys.argv[1], encoding="utf-8"))
    key = public_key(open(sys.argv[2], encoding="utf-8").read())
    cp = dict(proof["checkpoint"])
    body = proof["body"].encode("utf-8")
    prev, h = bytes.fromhex(proof["prev_hash"]), bytes.fromhex(proof["hash"])

    if sha256(b"rxflow-audit-v1", prev, body) != h:
        fail("the event body does not hash to its chain hash")
    if json.loads(body)["id"] != proof["event_id"]:
        fail("the body is not the event the proof names")
    seq, first, last, size = proof["seq"], cp["first_seq"], cp["last_seq"], cp["tree_size"]
    if not (first <= seq <= last) or proof["leaf_index"] != seq - first or size != last - first + 1:
        fail("the event is not inside the checkpoint's range")
    if seq == last and h != bytes.fromhex(cp["chain_head"]):
        fail("the last event is not the checkpoint's chain head")
    leaf = sha256(b"\x00", h)
    path = [bytes.fromhex(p) for p in proof["audit_path"]]
    if not verify_path(proof["leaf_index"], size, leaf, path, bytes.fromhex(cp["root"])):
        fail("the audit path does not lead to the checkpoint's root")
    if cp["algorithm"] != "ed25519":
        fail(f"unsupported algorithm {cp['algorithm']}")
    sig = bytes.fromhex(cp.pop("signature"))
    msg = b"rxflow-audit-checkpoint/v1\n" + json.dumps(
        cp, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
    except InvalidSignature:
        fail("the checkpoint signature does not verify with this public key")
    print(f"event {proof['event_id']} (seq {seq}) is in checkpoint {cp['number']}, signed by {cp['key_id']}")


if __name__ == "__main__":
    main()
