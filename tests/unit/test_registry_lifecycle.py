"""The registry's certificate lifecycle on real SQLite: one current certificate per identity,
its fallback, per-certificate revocation, suspension of every certificate, re-key, readmit."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from enroll_server.registry import (
    CertificateNotCurrent,
    DeviceNotActive,
    DeviceState,
    EventKind,
    IssuedCertificate,
    Registry,
    UnknownCertificate,
    schema,
)
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa
from tests.unit.test_registry import NOW, TTL, enroll, issued, token_hash

DEV = DeviceId("dev-life")
THEN = "2026-01-01T00:00:00.000000Z"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    """The registry on each backend in turn (conftest.registry_location)."""
    with Registry.open(registry_location) as registry:
        yield registry


def renew(
    reg: Registry, ca: MemoryCa, old: IssuedCertificate, *, minutes: int = 1
) -> IssuedCertificate:
    new = issued(ca, old.device_id.value, now=NOW + timedelta(minutes=minutes))
    reg.record_issuance(
        new,
        consume_token_hash=None,
        supersedes_serial=old.serial,
        now=NOW + timedelta(minutes=minutes),
        actor="est",
    )
    return new


def statuses(reg: Registry, device: DeviceId = DEV) -> dict[int, tuple[str, str | None]]:
    return {c.serial: (c.status.value, c.revocation_reason) for c in reg.certificates_of(device)}


def test_only_the_newest_or_its_unused_fallback_renews(reg: Registry, ca: MemoryCa) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    c = renew(reg, ca, a, minutes=2)  # from the fallback: B was never used, B is cut off
    assert statuses(reg) == {
        a.serial: ("superseded", None),
        b.serial: ("revoked", "superseded"),
        c.serial: ("active", None),
    }
    assert reg.get_certificate(c.serial).fallback_serial == a.serial  # type: ignore[union-attr]
    with pytest.raises(CertificateNotCurrent, match="revoked"):
        renew(reg, ca, b, minutes=3)
    # C is used (the broker admits it): A is cut off and can no longer renew.
    assert reg.settle_certificate(c.serial, now=NOW + timedelta(minutes=4), actor="broker") == [
        a.serial
    ]
    assert reg.settle_certificate(c.serial, now=NOW, actor="broker") == []  # once only
    with pytest.raises(CertificateNotCurrent, match=r"is revoked \(superseded\)"):
        renew(reg, ca, a, minutes=5)
    events = [(e.kind, e.serials) for e in reg.events_since(0) if e.device_id == DEV]
    assert events == [(EventKind.SUPERSEDED, (b.serial,)), (EventKind.SUPERSEDED, (a.serial,))]
    entries = {e.serial: e.reason for e in reg.revoked_entries(NOW)}
    assert entries == {a.serial: "superseded", b.serial: "superseded"}


def test_a_renewal_is_the_first_use_of_the_renewing_certificate(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    d = renew(reg, ca, b, minutes=2)
    assert statuses(reg) == {
        a.serial: ("revoked", "superseded"),
        b.serial: ("superseded", None),
        d.serial: ("active", None),
    }


def test_suspension_holds_every_valid_certificate_and_resume_gives_each_its_status_back(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    assert sorted(reg.suspend_device(DEV, now=NOW, actor="op")) == sorted([a.serial, b.serial])
    assert {e.serial: e.reason for e in reg.revoked_entries(NOW)} == {
        a.serial: "certificateHold",
        b.serial: "certificateHold",
    }
    assert sorted(reg.resume_device(DEV, now=NOW, actor="op")) == sorted([a.serial, b.serial])
    assert statuses(reg) == {a.serial: ("superseded", None), b.serial: ("active", None)}
    assert reg.revoked_entries(NOW) == []


def test_resume_leaves_a_certificate_revoked_for_another_reason_revoked(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    reg.suspend_device(DEV, now=NOW, actor="op")
    assert reg.revoke_certificate(a.serial, reason="key-compromise", now=NOW, actor="op") == (
        DEV,
        [a.serial],
    )
    assert reg.resume_device(DEV, now=NOW, actor="op") == [b.serial]
    assert statuses(reg) == {a.serial: ("revoked", "keyCompromise"), b.serial: ("active", None)}


def test_revoking_one_certificate_keeps_the_identity_and_takes_its_fallback_along(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    device, serials = reg.revoke_certificate(b.serial, reason="key-compromise", now=NOW, actor="op")
    assert device == DEV and serials == sorted([a.serial, b.serial])
    assert reg.get_device(DEV).state is DeviceState.ACTIVE  # type: ignore[union-attr]
    assert reg.revoke_certificate(b.serial, reason="unspecified", now=NOW, actor="op") == (
        DEV,
        [],
    )
    (event,) = [e for e in reg.events_since(0) if e.kind is EventKind.CERT_REVOKED]
    assert sorted(event.serials) == sorted([a.serial, b.serial])
    with pytest.raises(UnknownCertificate):
        reg.revoke_certificate(12345, reason="unspecified", now=NOW, actor="op")
    with pytest.raises(ValueError, match="certificate-hold"):
        reg.revoke_certificate(b.serial, reason="certificate-hold", now=NOW, actor="op")


def test_rekey_cuts_off_every_certificate_and_the_new_token_enrolls(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    cut = reg.rekey_device(
        DEV, token_hash=token_hash("rekey"), token_expires_at=NOW + TTL, now=NOW, actor="op"
    )
    assert cut == sorted([a.serial, b.serial])
    assert reg.get_device(DEV).state is DeviceState.PROVISIONED  # type: ignore[union-attr]
    fresh = issued(ca, DEV.value)
    reg.record_issuance(
        fresh, consume_token_hash=token_hash("rekey"), supersedes_serial=None, now=NOW, actor="est"
    )
    assert statuses(reg) == {
        a.serial: ("revoked", "superseded"),
        b.serial: ("revoked", "superseded"),
        fresh.serial: ("active", None),
    }
    reg.suspend_device(DEV, now=NOW, actor="op")
    with pytest.raises(DeviceNotActive, match="suspended"):
        reg.rekey_device(
            DEV, token_hash=token_hash("x"), token_expires_at=NOW + TTL, now=NOW, actor="op"
        )


def test_readmit_lets_a_revoked_device_enroll_again_and_keeps_its_certificates_revoked(
    reg: Registry, ca: MemoryCa
) -> None:
    a = enroll(reg, ca, DEV.value)
    with pytest.raises(DeviceNotActive, match="active"):
        reg.readmit_device(
            DEV, token_hash=token_hash("back"), token_expires_at=NOW + TTL, now=NOW, actor="op"
        )
    reg.revoke_device(DEV, reason="key-compromise", now=NOW, actor="op")
    reg.readmit_device(
        DEV, token_hash=token_hash("back"), token_expires_at=NOW + TTL, now=NOW, actor="op"
    )
    assert reg.get_device(DEV).state is DeviceState.PROVISIONED  # type: ignore[union-attr]
    fresh = issued(ca, DEV.value)
    reg.record_issuance(
        fresh, consume_token_hash=token_hash("back"), supersedes_serial=None, now=NOW, actor="est"
    )
    assert statuses(reg) == {a.serial: ("revoked", "keyCompromise"), fresh.serial: ("active", None)}
    (audit,) = [e for e in reg.audit_log(device_id=DEV) if e.action == "device.readmit"]
    assert audit.detail == {"revocation_reasons": ["keyCompromise"]}


def _insert(raw: sqlite3.Connection, cert: IssuedCertificate, status: str) -> None:
    raw.execute(
        "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?)",
        (
            format(cert.serial, "x"),
            cert.device_id.value,
            cert.fingerprint_sha256,
            cert.not_before.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            cert.not_after.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            cert.not_before.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            status,
            cert.pem,
        ),
    )


def test_schema_5_leaves_one_current_certificate_per_identity(db_path: Path, ca: MemoryCa) -> None:
    """A schema 4 registry with the old behaviour's leftovers: two active certificates (a
    reissued token) and two superseded ones (renewals); each older one is revoked."""
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
    for migration in schema.MIGRATIONS[:4]:
        for statement in migration.statements:
            raw.execute(statement)
        raw.execute("INSERT INTO schema_version VALUES (?, ?)", (migration.version, THEN))
    raw.execute(
        "INSERT INTO devices (id, role, state, created_at, updated_at) "
        "VALUES ('legacy', 'device', 'active', ?, ?)",
        (THEN, THEN),
    )
    certs = [issued(ca, "legacy", now=NOW + timedelta(minutes=i)) for i in range(4)]
    for cert, status in zip(certs, ("superseded", "superseded", "active", "active"), strict=True):
        _insert(raw, cert, status)
    raw.execute("INSERT INTO events (at, kind, device_id) VALUES (?, 'revoked', 'x')", (THEN,))
    raw.close()

    with Registry.open(db_path) as reg:
        assert statuses(reg, DeviceId("legacy")) == {
            certs[0].serial: ("revoked", "superseded"),
            certs[1].serial: ("superseded", None),
            certs[2].serial: ("revoked", "superseded"),
            certs[3].serial: ("active", None),
        }
        assert reg.get_certificate(certs[3].serial).fallback_serial == certs[1].serial  # type: ignore[union-attr]
        audited = [e for e in reg.audit_log() if e.action == "certificate.supersede"]
        assert len(audited) == 2
        # The events keep their seq, and take the new kinds.
        assert [e.seq for e in reg.events_since(0)] == [1]
        a = renew(reg, ca, certs[3])
        assert reg.events_since(1)[0].seq == 2 and reg.events_since(1)[0].serials == (
            certs[1].serial,
        )
        assert statuses(reg, DeviceId("legacy"))[a.serial] == ("active", None)


def test_mosquitto_drops_sessions_on_an_operators_revocation_not_on_supersession(
    reg: Registry, ca: MemoryCa
) -> None:
    """mosquitto-sync kicks by identity: an operator's certificate revocation must end a
    session presenting it; a renewal's cut-off is left to the CRL (the identity is busy
    reconnecting with its new certificate)."""
    from enroll_server.revocation.publisher import CrlUpdate

    a = enroll(reg, ca, DEV.value)
    b = renew(reg, ca, a)
    renew(reg, ca, b, minutes=2)  # B's first use: A superseded
    assert CrlUpdate(None, reg.events_since(0)).devices_to_drop() == []
    other = enroll(reg, ca, "dev-other")
    reg.revoke_certificate(other.serial, reason="key-compromise", now=NOW, actor="op")
    assert CrlUpdate(None, reg.events_since(0)).devices_to_drop() == ["dev-other"]
