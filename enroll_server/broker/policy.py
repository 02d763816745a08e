"""Who may connect to the broker: the pure admission decision over certificate and registry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import Protocol

from cryptography import x509

from enroll_server.pki.client_identity import (
    IdentityProblem,
    IdentityRefusal,
    check_client_certificate,
    common_name,
)
from fleetpki.identity import is_valid_id
from fleetpki.topics import Role, may_publish


class RefusalReason(StrEnum):
    """Why a CONNECT was refused; the values are the `reason` label of the refusal metric."""

    NO_CERTIFICATE = "no_certificate"
    CLIENT_ID_INVALID = "client_id_invalid"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    CERT_NOT_YET_VALID = "cert_not_yet_valid"
    CERT_EXPIRED = "cert_expired"
    CERT_WRONG_USAGE = "cert_wrong_usage"
    CERT_IDENTITY_MISMATCH = "cert_identity_mismatch"
    CERT_UNKNOWN = "cert_unknown"
    CERT_REVOKED = "cert_revoked"
    CERT_SUSPENDED = "cert_suspended"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_NOT_ACTIVE = "device_not_active"
    DEVICE_SUSPENDED = "device_suspended"
    DEVICE_REVOKED = "device_revoked"
    WILL_TOPIC_DENIED = "will_topic_denied"
    KEEPALIVE_OUT_OF_RANGE = "keepalive_out_of_range"
    PROTOCOL_VERSION = "protocol_version"
    MALFORMED_CONNECT = "malformed_connect"
    CONNECT_TIMEOUT = "connect_timeout"
    SERVER_FULL = "server_full"
    REGISTRY_UNAVAILABLE = "registry_unavailable"


# MQTT 3.1.1 section 3.2.2.3 CONNACK return codes. The identity-binding failures answer
# "identifier rejected" (0x02) so a misconfigured device sees at once that its client id is
# the problem; everything about the certificate or the registry is "not authorized" (0x05).
CONNACK_IDENTIFIER_REJECTED = 0x02
CONNACK_SERVER_UNAVAILABLE = 0x03
CONNACK_NOT_AUTHORIZED = 0x05

_IDENTIFIER_REASONS = frozenset(
    {
        RefusalReason.CLIENT_ID_INVALID,
        RefusalReason.CLIENT_ID_MISMATCH,
        RefusalReason.KEEPALIVE_OUT_OF_RANGE,
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused CONNECT: the reason (a metric label) and a sentence for the log."""

    reason: RefusalReason
    detail: str

    @property
    def connack_code(self) -> int:
        if self.reason in _IDENTIFIER_REASONS:
            return CONNACK_IDENTIFIER_REJECTED
        if self.reason is RefusalReason.REGISTRY_UNAVAILABLE:
            return CONNACK_SERVER_UNAVAILABLE
        return CONNACK_NOT_AUTHORIZED


@dataclass(frozen=True, slots=True)
class Admission:
    """An accepted CONNECT: who is connected, as what, with which certificate."""

    identity: str
    role: Role
    serial: int
    not_after: datetime


def value_text(value: object) -> str:
    """'active' from DeviceState.ACTIVE, 'dev1' from DeviceId('dev1'), a str unchanged."""
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


class DeviceView(Protocol):
    """What the decision needs of a registry device (enroll_server.registry.models.Device)."""

    @property
    def device_id(self) -> object: ...
    @property
    def role(self) -> object: ...
    @property
    def state(self) -> object: ...


class CertificateView(Protocol):
    """What the decision needs of a registry certificate record (CertificateRecord)."""

    @property
    def serial(self) -> int: ...
    @property
    def device_id(self) -> object: ...
    @property
    def status(self) -> object: ...
    @property
    def fingerprint_sha256(self) -> str: ...


_IDENTITY_REFUSALS = {problem: RefusalReason(problem.value) for problem in IdentityProblem}
_DEVICE_STATE_REFUSALS = {
    "suspended": RefusalReason.DEVICE_SUSPENDED,
    "revoked": RefusalReason.DEVICE_REVOKED,
}
# A superseded certificate (replaced by a renewal) is admitted until it expires: a device that
# lost power between the server issuing its new certificate and storing it comes back with the
# old one, and must get in ("old or new identity works, never neither"). Revocation revokes
# superseded certificates too, so a compromise still shuts every one of them out.
_CERT_STATUS_REFUSALS = {
    "revoked": RefusalReason.CERT_REVOKED,
    "on_hold": RefusalReason.CERT_SUSPENDED,
}


def decide_connect(
    client_id: str | None,
    cert: x509.Certificate | None,
    device: DeviceView | None,
    cert_record: CertificateView | None,
    now: datetime,
    *,
    fingerprint_sha256: str | None = None,
) -> Admission | Refusal:
    """Admit a CONNECT only if client id = certificate CN = an active registered identity whose
    certificate (the very one: its fingerprint) is active in the registry and valid at `now`.

    `device` is the registry record of `client_id` and `cert_record` that of the certificate's
    serial (None when absent); `fingerprint_sha256` the SHA-256 hex of the DER presented
    (computed from `cert` if not given). The TLS layer has already verified the chain to our CA.
    """
    if cert is None:
        return Refusal(RefusalReason.NO_CERTIFICATE, "no client certificate was presented")
    if client_id is None or not is_valid_id(client_id):
        return Refusal(RefusalReason.CLIENT_ID_INVALID, f"client id {client_id!r} is not an id")
    cn = common_name(cert)
    if cn != client_id:
        return Refusal(
            RefusalReason.CLIENT_ID_MISMATCH,
            f"client id {client_id!r} differs from the certificate CN {cn!r}",
        )
    # Who the certificate is (pki.client_identity, shared with EST re-enrollment): valid at
    # `now`, clientAuth, the registry's very certificate (fingerprint) of a registered
    # identity whose role its SAN URI names. The TLS layer trusts only the fleet chain here.
    identity = check_client_certificate(
        cert, device, cert_record, now, fingerprint_sha256=fingerprint_sha256, cn=cn
    )
    if isinstance(identity, IdentityRefusal):
        return Refusal(_IDENTITY_REFUSALS[identity.problem], identity.detail)
    assert device is not None and cert_record is not None  # a ClientIdentity has both
    state = value_text(device.state)
    if state != "active":
        return Refusal(
            _DEVICE_STATE_REFUSALS.get(state, RefusalReason.DEVICE_NOT_ACTIVE),
            f"{client_id} is {state}",
        )
    serial = identity.serial
    status = value_text(cert_record.status)
    if status not in ("active", "superseded"):
        return Refusal(
            _CERT_STATUS_REFUSALS.get(status, RefusalReason.CERT_UNKNOWN),
            f"certificate serial {serial:x} of {client_id} is {status}",
        )
    return Admission(client_id, identity.role, serial, identity.not_after)


def check_will(admission: Admission, will_topic: str | None) -> Refusal | None:
    """A will is a publish made later on the client's behalf, so it obeys the publish ACL."""
    if will_topic is None or may_publish(admission.role, admission.identity, will_topic):
        return None
    return Refusal(
        RefusalReason.WILL_TOPIC_DENIED,
        f"{admission.identity} may not publish its will to {will_topic!r}",
    )


@dataclass(frozen=True, slots=True)
class KeepalivePolicy:
    """Keepalive enforcement (MQTT 3.1.1 section 3.1.2.10).

    The server disconnects a client that sends nothing for `factor` x its keepalive. A 3.1.1
    server cannot impose a keepalive, so like mosquitto's `max_keepalive` a CONNECT asking for
    more than `max_seconds` -- or for 0, which means "never" -- is refused ("identifier
    rejected", as mosquitto answers). `max_seconds=None` accepts any value, 0 included.
    """

    factor: float = 1.5
    max_seconds: int | None = 3600

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"keepalive factor must be at least 1, got {self.factor}")
        if self.max_seconds is not None and not 1 <= self.max_seconds <= 65535:
            raise ValueError(f"max keepalive must be in 1..65535 seconds, got {self.max_seconds}")

    def check(self, keepalive: int) -> Refusal | None:
        if self.max_seconds is None:
            return None
        if keepalive == 0 or keepalive > self.max_seconds:
            return Refusal(
                RefusalReason.KEEPALIVE_OUT_OF_RANGE,
                f"keepalive {keepalive}s is outside 1..{self.max_seconds}s",
            )
        return None

    def idle_limit(self, keepalive: int) -> float | None:
        """Seconds of silence after which the client is dropped (None: never)."""
        return None if keepalive <= 0 else keepalive * self.factor
