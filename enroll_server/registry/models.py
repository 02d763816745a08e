"""Value types of the fleet registry: devices, batches, tokens, certificates, events, audit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from enroll_server.registry.errors import InvalidValue
from fleetpki.identity import DeviceId
from fleetpki.topics import Role  # one Role for registry and broker ACLs

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # fullmatch: '$' would accept a trailing newline


class DeviceState(StrEnum):
    """Lifecycle of a device: provisioned (has a token) -> active (has a cert) ->
    suspended (certs on hold, reversible) / revoked (terminal)."""

    PROVISIONED = "provisioned"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class CertStatus(StrEnum):
    """A certificate's status. An identity has at most one ACTIVE certificate (its newest) and
    at most one SUPERSEDED one: the certificate that newest one was renewed from, kept as a
    fallback only while the newest has never been used (a power cut may have lost it before
    the device stored it). The first use of the newest (the broker admits it, or it renews)
    revokes the fallback with reason superseded (RFC 5280 5.3.1): registry.certificates."""

    ACTIVE = "active"
    REVOKED = "revoked"
    ON_HOLD = "on_hold"  # RFC 5280 5.3.1 certificateHold: listed on the CRL, reversible
    SUPERSEDED = "superseded"  # the fallback of an unused renewal; valid until cut off


class BatchKind(StrEnum):
    TOKEN = "token"  # first enrollment with a one-time token (HTTP Basic, RFC 7030 3.2.3)
    IDEVID = "idevid"  # first enrollment with a factory certificate


class EventKind(StrEnum):
    """What the events journal records: the changes pollers (the broker, the CRL and
    mosquitto publishers) must react to. Issuances are not among them: the audit log records
    each (certificate.issue). Older registries still hold 'issued' events,
    which revocation_events_since skips."""

    REVOKED = "revoked"  # the device (and every certificate of it) is revoked
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    ISSUED = "issued"
    # Certificates of an identity that stays registered: an operator revoked them (one
    # certificate, or every one at a re-key) ...
    CERT_REVOKED = "cert_revoked"
    # ... or a newer certificate of the same identity took over (first use of a renewal, a
    # renewal from the fallback, a new enrollment with a token or a birth certificate).
    SUPERSEDED = "superseded"


# RFC 5280 5.3.1 CRLReason names, spelled as in the RFC (and as cryptography's
# x509.ReasonFlags values, so the CRL builder can do `x509.ReasonFlags(reason)`).
REVOCATION_REASONS: tuple[str, ...] = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "removeFromCRL",
    "privilegeWithdrawn",
    "aACompromise",
)
# certificateHold is what suspend_device records; removeFromCRL only exists in delta CRLs
# (RFC 5280 5.3.1), so neither is a reason an operator can revoke with.
REVOKE_REASONS: frozenset[str] = frozenset(REVOCATION_REASONS) - {
    "certificateHold",
    "removeFromCRL",
}
_REASON_BY_KEY = {r.lower(): r for r in REVOCATION_REASONS}
# How the CLI and the README spell each reason (`--reason key-compromise`); parse_reason takes
# either spelling, and its error lists these, the ones an operator types.
REASON_OPTIONS: dict[str, str] = {
    "unspecified": "unspecified",
    "keyCompromise": "key-compromise",
    "cACompromise": "ca-compromise",
    "affiliationChanged": "affiliation-changed",
    "superseded": "superseded",
    "cessationOfOperation": "cessation-of-operation",
    "certificateHold": "certificate-hold",
    "removeFromCRL": "remove-from-crl",
    "privilegeWithdrawn": "privilege-withdrawn",
    "aACompromise": "aa-compromise",
}
# The reasons an operator may revoke with, as typed: the --reason help and errors list these.
REVOKE_REASON_OPTIONS: tuple[str, ...] = tuple(
    REASON_OPTIONS[r] for r in REVOCATION_REASONS if r in REVOKE_REASONS
)


def parse_reason(text: str) -> str:
    """'key-compromise', 'key_compromise', 'keyCompromise' -> 'keyCompromise' (RFC 5280 name)."""
    key = text.replace("-", "").replace("_", "").lower()
    try:
        return _REASON_BY_KEY[key]
    except KeyError:
        raise InvalidValue(
            "revocation reason",
            text,
            "not a revocation reason (RFC 5280 5.3.1): " + ", ".join(REVOKE_REASON_OPTIONS),
        ) from None


_SERIAL_HEX = re.compile(r"[0-9a-f]{1,40}")


def parse_serial(text: str) -> int:
    """A certificate serial as fleetpki prints it (hex, as `openssl x509 -serial` does too;
    '0x' and ':' separators accepted) -> int. RFC 5280 4.1.2.2: positive, at most 20 octets."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not _SERIAL_HEX.fullmatch(cleaned) or int(cleaned, 16) == 0:
        raise InvalidValue(
            "certificate serial", text, "expected a positive hexadecimal number of 20 octets"
        )
    return int(cleaned, 16)


def check_sha256_hex(what: str, value: str) -> str:
    """A SHA-256 digest as 64 lowercase hex characters (the one form the registry stores)."""
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise InvalidValue(what, value, "expected 64 lowercase hex characters (SHA-256)")
    return value


def check_aware(what: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidValue(what, value, "expected a timezone-aware datetime")
    return value


@dataclass(frozen=True, slots=True)
class NewDevice:
    """One device of a factory batch. `token_hash` is the SHA-256 hex of its one-time token
    (None for IDevID batches); `token_expires_at` None means batch creation time + token_ttl."""

    device_id: DeviceId
    token_hash: str | None = None
    token_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Device:
    device_id: DeviceId
    role: Role
    batch_id: str | None
    state: DeviceState
    created_at: datetime
    updated_at: datetime
    enrolled_at: datetime | None  # first successful enrollment
    token_expires_at: datetime | None  # expiry of the latest enrollment token, if any


@dataclass(frozen=True, slots=True)
class TokenHolder:
    """The device an enrollment token belongs to, as authorization needs it (check_token_holder)."""

    device_id: DeviceId
    role: Role
    state: DeviceState


@dataclass(frozen=True, slots=True)
class UnusedToken:
    """An unused enrollment token of a device that may enroll (unused_tokens), with the tokens
    table's rowid: tokens are only ever inserted (a reissue adds a row and spends the old
    one), so the rowid tells which ones a reader has not seen yet."""

    rowid: int
    device_id: DeviceId
    token_hash: str
    expires_at: datetime
    role: Role


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    created_at: datetime
    device_count: int
    token_ttl: timedelta
    note: str
    kind: BatchKind
    # IDevID lots: the manufacturer (H/manufacturers/<name>) whose birth certificates alone
    # may enroll the lot; None for token batches and IDevID lots from before schema 7.
    manufacturer: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """What the issuer hands to record_issuance: the certificate just signed."""

    serial: int
    device_id: DeviceId
    fingerprint_sha256: str  # lowercase hex of SHA-256 over the DER certificate
    not_before: datetime
    not_after: datetime
    pem: str
    # The signing issuing CA's SubjectKeyIdentifier, lowercase hex (home.issuers.key_id).
    issuer_key_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.serial, int) or self.serial <= 0:
            # RFC 5280 4.1.2.2: serial numbers are positive integers.
            raise InvalidValue("certificate serial", self.serial, "must be a positive integer")
        check_sha256_hex("certificate fingerprint", self.fingerprint_sha256)
        check_aware("not_before", self.not_before)
        check_aware("not_after", self.not_after)


@dataclass(frozen=True, slots=True)
class Issuance:
    """One issuance to record (record_issuances): the certificate, and what it consumes.

    `consume_token_hash`: the one-time enrollment token spent by this issuance (simpleenroll);
    `supersedes_serial`: the certificate it renews (simplereenroll, IDevID re-bootstrap).
    """

    cert: IssuedCertificate
    consume_token_hash: str | None
    supersedes_serial: int | None
    now: datetime
    actor: str


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: int
    device_id: DeviceId
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    status: CertStatus
    revoked_at: datetime | None
    revocation_reason: str | None  # RFC 5280 5.3.1 name, e.g. 'keyCompromise'
    pem: str
    # The certificate this one was renewed from, kept as its fallback (status SUPERSEDED)
    # until this one is first used; None once used, or when there is none.
    fallback_serial: int | None = None
    # The issuing CA that signed it (its SubjectKeyIdentifier, hex); None: from before schema
    # 9, signed by the home's first issuing CA (schema._V9).
    issuer_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One CRL entry (RFC 5280 5.3): serial, revocationDate, reasonCode name."""

    serial: int
    revoked_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    """A change other processes must react to (the broker drops sessions on 'revoked')."""

    seq: int
    at: datetime
    kind: EventKind
    device_id: DeviceId
    serials: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str
    action: str
    device_id: DeviceId | None
    detail: dict[str, Any] = field(default_factory=dict)


class OperatorRole(StrEnum):
    """What an operator credential may do on the admin API: everything, or read only."""

    ADMIN = "admin"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Operator:
    """A named operator credential (the token itself is never stored, only SHA-256 of it)."""

    name: str
    role: OperatorRole
    created_at: datetime
    rotated_at: datetime | None

    @property
    def actor(self) -> str:
        """How the audit log names what this operator did through the admin API."""
        return f"operator:{self.name}"


@dataclass(frozen=True, slots=True)
class OperatorCredential:
    """An operator and the SHA-256 of its current token: what authentication compares."""

    operator: Operator
    token_hash: str
