"""One INFO line per enrollment and renewal (fleetpki.service): device id, serial, not after;
never the token, the CSR or a key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key
from tests.integration.test_est import enroll, leaf, reenroll, write_identity
from tests.live_server import LiveServer


def test_each_enrollment_and_renewal_logs_one_line_without_secrets(
    live_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleetpki.service")
    token = live_server.mint_device("dev-log")
    key = generate_key(KeyType.EC_P256)
    reply = enroll(live_server, "dev-log", token, key)
    assert reply.status == 200, reply.text
    cert = leaf(decode_certs_only(reply.body))
    c, k = write_identity(tmp_path, cert, key)
    renewed_reply = reenroll(live_server, c, k, "dev-log")
    assert renewed_reply.status == 200, renewed_reply.text
    renewed = leaf(decode_certs_only(renewed_reply.body))

    lines = [r.getMessage() for r in caplog.records if r.name == "fleetpki.service"]
    assert lines == [
        f"enrolled: device dev-log, serial {cert.serial_number:x}, "
        f"not after {cert.not_valid_after_utc.isoformat(timespec='seconds')}",
        f"renewed: device dev-log, serial {renewed.serial_number:x}, "
        f"not after {renewed.not_valid_after_utc.isoformat(timespec='seconds')}",
    ]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    for record in caplog.records:
        text = record.getMessage()
        assert token not in text and key_pem not in text
