"""CRL building: every extension parsed back, reason codes, refresh timing, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from enroll_server.pki.crl import (
    CRL_BACKDATE,
    BadCrlParameter,
    UnknownRevocationReason,
    build_crl,
    crl_needs_refresh,
    crl_refresh_at,
)
from enroll_server.pki.keys import KeyType
from enroll_server.pki.serial import new_serial
from enroll_server.registry.models import RevokedEntry
from tests.pki_helpers import URLS, MemoryCa, make_ca

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


def _entries() -> list[RevokedEntry]:
    return [
        RevokedEntry(1001, NOW - timedelta(hours=3), "keyCompromise"),
        RevokedEntry(1002, NOW - timedelta(hours=2), "unspecified"),
        RevokedEntry(1003, NOW - timedelta(hours=1), "certificateHold"),
        RevokedEntry(1004, NOW - timedelta(minutes=5), "cessationOfOperation"),
    ]


def test_crl_carries_number_aki_idp_and_dates(ca: MemoryCa) -> None:
    crl = build_crl(ca.issuing.cert, ca.issuing.key, _entries(), 42, NOW, DAY, URLS.crl)

    assert crl.issuer == ca.issuing.cert.subject
    assert crl.is_signature_valid(ca.issuing.cert.public_key())  # type: ignore[arg-type]
    assert crl.last_update_utc == NOW - CRL_BACKDATE
    assert crl.next_update_utc == NOW + DAY

    number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == 42
    assert not number.critical

    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.issuing.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical  # RFC 5280 5.2.5
    assert idp.value.full_name == [x509.UniformResourceIdentifier(URLS.crl)]
    assert idp.value.only_contains_user_certs
    assert not idp.value.only_contains_ca_certs
    assert not idp.value.indirect_crl


def test_idp_matches_the_device_certificate_distribution_point(ca: MemoryCa) -> None:
    # A scope-checking relying party uses the CRL only if the IDP names the cert's CDP.
    cert, _ = ca.device_cert("idp-match-1")
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    crl = build_crl(ca.issuing.cert, ca.issuing.key, [], 1, NOW, DAY, URLS.crl)
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert list(idp.full_name or []) == list(cdp[0].full_name or [])


def test_reason_codes_and_revocation_dates(ca: MemoryCa) -> None:
    entries = _entries()
    crl = build_crl(ca.issuing.cert, ca.issuing.key, entries, 7, NOW, DAY, URLS.crl)
    assert len(crl) == len(entries)
    for entry in entries:
        revoked = crl.get_revoked_certificate_by_serial_number(entry.serial)
        assert revoked is not None
        assert revoked.revocation_date_utc == entry.revoked_at.replace(microsecond=0)
        reasons = [e for e in revoked.extensions if isinstance(e.value, x509.CRLReason)]
        if entry.reason == "unspecified":
            # RFC 5280 5.3.1: absent rather than unspecified.
            assert reasons == []
        else:
            assert len(reasons) == 1
            assert reasons[0].value.reason.value == entry.reason
            assert not reasons[0].critical


def test_empty_crl_is_valid(ca: MemoryCa) -> None:
    crl = build_crl(ca.issuing.cert, ca.issuing.key, [], 1, NOW, DAY, URLS.crl)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.issuing.cert.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [KeyType.ED25519, KeyType.RSA_2048, KeyType.EC_P384])
def test_crl_signed_with_every_issuer_key_type(kind: KeyType) -> None:
    other = make_ca(kind)
    crl = build_crl(other.issuing.cert, other.issuing.key, _entries(), 3, NOW, DAY, URLS.crl)
    assert crl.is_signature_valid(other.issuing.cert.public_key())  # type: ignore[arg-type]


def test_large_crl_holds_every_serial(ca: MemoryCa) -> None:
    entries = [RevokedEntry(new_serial(), NOW, "superseded") for _ in range(20_000)]
    crl = build_crl(ca.issuing.cert, ca.issuing.key, entries, 9, NOW, DAY, URLS.crl)
    assert len(crl) == 20_000
    for entry in entries[::997]:
        assert crl.get_revoked_certificate_by_serial_number(entry.serial) is not None


@pytest.mark.parametrize("reason", ["keycompromise", "key-compromise", "bogus", ""])
def test_unknown_reason_is_refused_with_the_serial(ca: MemoryCa, reason: str) -> None:
    with pytest.raises(UnknownRevocationReason) as info:
        build_crl(
            ca.issuing.cert, ca.issuing.key, [RevokedEntry(77, NOW, reason)], 1, NOW, DAY, "u"
        )
    assert info.value.serial == 77
    assert info.value.reason == reason
    assert "4d" in str(info.value)  # 77 in hex


def test_remove_from_crl_is_refused_in_a_full_crl(ca: MemoryCa) -> None:
    with pytest.raises(UnknownRevocationReason, match="delta CRL"):
        build_crl(
            ca.issuing.cert,
            ca.issuing.key,
            [RevokedEntry(5, NOW, "removeFromCRL")],
            1,
            NOW,
            DAY,
            URLS.crl,
        )


@pytest.mark.parametrize(
    ("number", "lifetime"), [(-1, DAY), (2**159, DAY), (1, timedelta(0)), (1, -DAY)]
)
def test_bad_number_or_lifetime(ca: MemoryCa, number: int, lifetime: timedelta) -> None:
    with pytest.raises(BadCrlParameter):
        build_crl(ca.issuing.cert, ca.issuing.key, [], number, NOW, lifetime, URLS.crl)


def test_refresh_at_half_life(ca: MemoryCa) -> None:
    crl = build_crl(ca.issuing.cert, ca.issuing.key, [], 1, NOW, DAY, URLS.crl)
    half = crl.last_update_utc + (DAY + CRL_BACKDATE) / 2
    assert crl_refresh_at(crl) == half
    assert not crl_needs_refresh(crl, NOW)
    assert not crl_needs_refresh(crl, half - timedelta(seconds=1))
    assert crl_needs_refresh(crl, half)
    assert crl_needs_refresh(crl, NOW + 2 * DAY)  # long lapsed


def test_refresh_well_before_next_update_for_short_lifetimes(ca: MemoryCa) -> None:
    crl = build_crl(ca.issuing.cert, ca.issuing.key, [], 1, NOW, timedelta(hours=1), URLS.crl)
    assert crl.next_update_utc is not None
    assert crl_refresh_at(crl) < crl.next_update_utc - timedelta(minutes=20)
