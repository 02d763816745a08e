"""Fuzz the agent's handling of a PKCS#7 certs-only reply (device_agent/est_wire.py).

The body of a 200 to simpleenroll/simplereenroll, and of /cacerts, goes through
decode_certs_only, then order_chain and check_issued (is this our key, our name, a chain to
our anchor?) and check_cacerts. Only WireError may come out: the agent maps it to "the server
sent garbage", retries later and keeps its current certificate.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    from device_agent.est_wire import (
        WireError,
        check_cacerts,
        check_issued,
        decode_certs_only,
        order_chain,
    )
    from fleetpki.identity import DeviceId
    from tests.pki_helpers import make_ca

CA = make_ca()
CERT, KEY = CA.device_cert("dev-0001")
DEVICE = DeviceId("dev-0001")
NOW = datetime.now(UTC)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    encoding = ("base64", "binary", None)[data[0] % 3]
    try:
        certs = decode_certs_only(data[1:], encoding)
    except WireError:
        return
    try:
        chain = order_chain(KEY, certs, [CA.issuing.cert])
        check_issued(chain, KEY, DEVICE, [CA.root.cert], NOW)
    except WireError:
        pass
    try:
        check_cacerts(certs, [CA.root.cert])
    except WireError:
        pass


def seeds() -> list[bytes]:
    full = pkcs7.serialize_certificates([CERT, CA.issuing.cert], Encoding.DER)
    leaf = pkcs7.serialize_certificates([CERT], Encoding.DER)
    cas = pkcs7.serialize_certificates([CA.issuing.cert, CA.root.cert], Encoding.DER)
    return [
        b"\x00" + base64.encodebytes(full),
        b"\x01" + full,
        b"\x02" + base64.b64encode(leaf),
        b"\x00" + base64.encodebytes(cas),
    ]


if __name__ == "__main__":
    _harness.main("agent_pkcs7", test_one_input, seeds)
