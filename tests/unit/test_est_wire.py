"""EST wire encoding (RFC 7030 / RFC 8951), csrattrs DER, the throttle and the config loader."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enroll_server.enrollment.throttle import Throttle, source_key
from enroll_server.est.csrattrs import csr_attrs_der
from enroll_server.est.wire import (
    BadEstBody,
    decode_base64_body,
    decode_certs_only,
    encode_certs_only,
)
from enroll_server.home.config import ConfigError, ServerConfig, load_config, render_config
from enroll_server.pki.keys import KeyType
from tests.pki_helpers import MemoryCa


def test_base64_with_line_breaks_and_pem_armour() -> None:
    raw = bytes(range(200))
    b64 = base64.encodebytes(raw)  # 76-char lines
    assert decode_base64_body(b64) == raw
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + b64 + b"-----END CERTIFICATE REQUEST-----\n"
    assert decode_base64_body(pem) == raw
    with pytest.raises(BadEstBody, match="not valid base64"):
        decode_base64_body(b"abc*def")
    with pytest.raises(BadEstBody, match="empty body"):
        decode_base64_body(b"  \n")


def test_certs_only_roundtrip(ca: MemoryCa) -> None:
    body = encode_certs_only([ca.issuing.cert, ca.root.cert])
    assert max(len(line) for line in body.splitlines()) <= 64
    assert {c.serial_number for c in decode_certs_only(body)} == {
        ca.issuing.cert.serial_number,
        ca.root.cert.serial_number,
    }


def test_certs_only_from_der_is_byte_identical_to_cryptography(ca: MemoryCa) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    from enroll_server.est.wire import certs_only_der

    device, _ = ca.device_cert("wire-dev-1")
    der = serialization.Encoding.DER
    for chain in (
        [device, ca.issuing.cert],
        [ca.issuing.cert, device],
        [ca.issuing.cert, ca.root.cert],
        [device],
    ):
        assert certs_only_der([c.public_bytes(der) for c in chain]) == (
            pkcs7.serialize_certificates(chain, der)
        )
    # Long-form lengths (> 255 octets) of every nesting level are exercised by real chains;
    # a short one too (< 128 octets), with a fake "certificate" of 10 octets.
    tiny = certs_only_der([b"\x30\x08" + b"\x00" * 8])
    assert tiny[:2] == bytes((0x30, len(tiny) - 2))


def test_service_pem_is_what_cryptography_writes(ca: MemoryCa) -> None:
    from cryptography.hazmat.primitives import serialization

    from enroll_server.enrollment.service import certificate_pem

    for cert in (ca.device_cert("wire-pem-1")[0], ca.issuing.cert, ca.root.cert):
        assert certificate_pem(cert.public_bytes(serialization.Encoding.DER)) == (
            cert.public_bytes(serialization.Encoding.PEM).decode()
        )


def test_csrattrs_parses_with_openssl(tmp_path: Path) -> None:
    der = csr_attrs_der(set(KeyType))
    (tmp_path / "attrs.der").write_bytes(der)
    r = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "attrs.der")],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for name in (
        "id-ecPublicKey",
        "prime256v1",
        "secp384r1",
        "ecdsa-with-SHA256",
        "rsaEncryption",
        "ED25519",
    ):
        assert name in r.stdout, (name, r.stdout)


def test_throttle_counts_failures_per_source_and_well_formed_device() -> None:
    t = Throttle(per_source=3, per_device=2, window=timedelta(seconds=60))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert t.failed("1.2.3.4", "dev", now) is None
    assert t.failed("1.2.3.4", "dev", now) is None
    over = t.failed("1.2.3.4", "dev", now)  # third failure for dev: over its 2
    assert over is not None and over.retry_after == 60
    assert t.failed("5.6.7.8", "other-dev", now) is None
    assert t.failed("1.2.3.4", "third-dev", now) is not None  # the source is over its 3
    # Later, after the window slid past, everything starts again.
    assert t.failed("1.2.3.4", "dev", now + timedelta(seconds=61)) is None
    # A malformed login is counted for its source alone: no key holds it.
    assert t.failed("9.9.9.9", "x" * 10_000, now) is None
    assert all(len(key) < 80 for key in t._by_key)


def test_throttle_groups_ipv6_by_64_and_maps_ipv4() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:10.0.0.7") == source_key("10.0.0.7") == "src:10.0.0.7"
    assert source_key("fe80::1%eth0") == source_key("fe80::2")
    t = Throttle(per_source=2, per_device=100)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    t.failed("2001:db8::1", "a", now)
    t.failed("2001:db8::2", "b", now)
    assert t.failed("2001:db8::ffff:3", "c", now) is not None


def test_throttle_table_is_capped_oldest_evicted() -> None:
    t = Throttle(per_source=10**6, per_device=5, max_keys=50)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1000):
        t.failed("1.2.3.4", f"dev-{i}", now)
    assert len(t) == 50
    assert "dev:dev-999" in t._by_key and "dev:dev-0" not in t._by_key
    assert "src:1.2.3.4" in t._by_key  # refreshed by each failure, never the oldest


def test_config_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "fleetpki.toml"
    path.write_text(render_config(ServerConfig(est_port=9443)))
    cfg = load_config(path)
    assert cfg.est_port == 9443 and cfg.device_validity == timedelta(days=30)
    assert cfg.urls().crl == "http://localhost:8080/crl"
    path.write_text('[server]\nest_port = "x"\n')
    with pytest.raises(ConfigError, match=r"\[server.est_port\] must be of type int"):
        load_config(path)
    path.write_text('[ca]\ndevice_validity = "forever"\n')
    with pytest.raises(ConfigError, match=r"\[ca.device_validity\] invalid duration"):
        load_config(path)
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    path.write_text("[server]\nmqtt_port = 70000\n")
    with pytest.raises(ConfigError, match="out of range"):
        load_config(path)
