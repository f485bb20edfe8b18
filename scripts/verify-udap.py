#!/usr/bin/env python3
"""Checks a UDAP server metadata document the way a UDAP client would, with an
implementation independent of the proxy's (PyJWT and `cryptography`).

    verify-udap.py --metadata FILE|URL --anchor CA.pem --base-url URL [--max-lifetime S]

Checks: the required metadata fields; `signed_metadata` is a JWS whose header has
`alg` RS256/ES256/ES384 and an `x5c` chain (base64 DER, leaf first); every certificate
of the chain is valid now and signed by the next one, the last by the anchor (a
certificate of --anchor); the leaf is no CA and has --base-url as a URI subject
alternative name; the signature verifies with the leaf's key; `iss` = `sub` =
--base-url; `iat` <= now < `exp`; `exp - iat` <= --max-lifetime; `jti` present; the
endpoints in the JWT equal the document's. Prints `OK ...` and exits 0, or prints
what failed and exits 1.
"""

import argparse
import base64
import datetime
import json
import sys
import time
import urllib.request

import jwt
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

REQUIRED = [
    "udap_versions_supported",
    "udap_profiles_supported",
    "udap_authorization_extensions_supported",
    "udap_certifications_supported",
    "grant_types_supported",
    "scopes_supported",
    "token_endpoint",
    "token_endpoint_auth_methods_supported",
    "token_endpoint_auth_signing_alg_values_supported",
    "registration_endpoint",
    "registration_endpoint_jwt_signing_alg_values_supported",
    "signed_metadata",
]


def fail(message):
    print(f"FAIL {message}")
    sys.exit(1)


def load(source):
    if source.startswith("http://") or source.startswith("https://"):
        with urllib.request.urlopen(source, timeout=10) as r:
            return json.loads(r.read())
    with open(source, "rb") as f:
        return json.loads(f.read())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--metadata", required=True)
    p.add_argument("--anchor", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--max-lifetime", type=int, default=3600)
    a = p.parse_args()

    doc = load(a.metadata)
    for field in REQUIRED:
        if field not in doc:
            fail(f"metadata lacks `{field}`")
    if doc["udap_versions_supported"] != ["1"]:
        fail("udap_versions_supported is not [\"1\"]")
    if doc["token_endpoint_auth_methods_supported"] != ["private_key_jwt"]:
        fail("token_endpoint_auth_methods_supported is not [\"private_key_jwt\"]")

    token = doc["signed_metadata"]
    header = jwt.get_unverified_header(token)
    alg = header.get("alg")
    if alg not in ("RS256", "ES256", "ES384"):
        fail(f"header alg `{alg}` is not RS256/ES256/ES384")
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        fail("header has no x5c chain")
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in x5c]
    with open(a.anchor, "rb") as f:
        anchors = x509.load_pem_x509_certificates(f.read())

    now = datetime.datetime.now(datetime.timezone.utc)
    for i, cert in enumerate(chain):
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            fail(f"certificate {i} ({cert.subject.rfc4514_string()}) is not valid now")
        nxt = chain[i + 1] if i + 1 < len(chain) else None
        if nxt is not None:
            try:
                cert.verify_directly_issued_by(nxt)
            except Exception as e:  # noqa: BLE001
                fail(f"certificate {i} is not signed by certificate {i + 1}: {e}")
    last = chain[-1]
    if not any(_issued_by(last, anchor) for anchor in anchors):
        fail("the chain does not lead to the anchor")

    leaf = chain[0]
    try:
        bc = leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
        if bc.ca:
            fail("the leaf is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if a.base_url not in uris:
        fail(f"`{a.base_url}` is not a URI SAN of the leaf ({uris})")

    try:
        claims = jwt.decode(
            token,
            key=leaf.public_key(),
            algorithms=[alg],
            options={"require": ["iss", "sub", "iat", "exp", "jti"], "verify_aud": False},
        )
    except jwt.PyJWTError as e:
        fail(f"signed_metadata does not verify with the leaf's key: {e}")
    if claims["iss"] != a.base_url or claims["sub"] != a.base_url:
        fail(f"iss/sub are {claims['iss']}/{claims['sub']}, not {a.base_url}")
    t = int(time.time())
    if not (claims["iat"] <= t + 5 and t < claims["exp"]):
        fail("iat/exp do not hold now")
    lifetime = claims["exp"] - claims["iat"]
    if lifetime > a.max_lifetime:
        fail(f"lifetime {lifetime} s is more than {a.max_lifetime} s")
    for endpoint in ("token_endpoint", "registration_endpoint", "authorization_endpoint"):
        if endpoint in doc and claims.get(endpoint) != doc[endpoint]:
            fail(f"`{endpoint}` differs between the JWT and the document")
    print(
        f"OK signed_metadata {alg} by {leaf.subject.rfc4514_string()}, "
        f"chain of {len(chain)} to {last.issuer.rfc4514_string()}, "
        f"iss=sub={claims['iss']}, lifetime {lifetime} s"
    )


def _issued_by(cert, anchor):
    if cert.fingerprint(cert.signature_hash_algorithm) == anchor.fingerprint(
        cert.signature_hash_algorithm
    ):
        return True
    try:
        cert.verify_directly_issued_by(anchor)
        return True
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    main()
