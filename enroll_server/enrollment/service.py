"""EnrollmentService: authorize -> check CSR -> issue -> record. No HTTP, no clock of its own."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.enrollment.token_index import TokenIndex
from enroll_server.errors import (
    AuthenticationFailed,
    BadRequest,
    DeviceSuspended,
    Forbidden,
    Unavailable,
    device_inactive,
)
from enroll_server.pki.birth_certificate import check_birth_certificate
from enroll_server.pki.ca import Issuer
from enroll_server.pki.client_identity import (
    IdentityRefusal,
    check_client_certificate,
    common_name,
    issued_by,
)
from enroll_server.pki.csr_policy import Grant, check_csr, load_csr
from enroll_server.pki.errors import BirthCertificateRejected, CsrRejected
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PublicKey
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.signer import SignerError
from enroll_server.pki.template import TemplateMismatch, device_certificates
from enroll_server.registry import Issuance, Registry, RegistryError
from enroll_server.registry.errors import CertificateNotCurrent, DeviceNotActive, TokenRejected
from enroll_server.registry.models import (
    BatchKind,
    CertStatus,
    DeviceState,
    IssuedCertificate,
)
from fleetpki.identity import DeviceId, InvalidIdentifier

log = logging.getLogger("fleetpki.service")

# How long after issuance a lost reply may be fetched again with the spent token.
RETRY_WINDOW = timedelta(minutes=15)
# Seconds a device is asked to wait (Retry-After) when the CA key's token cannot sign.
SIGNER_RETRY_AFTER = 10
# One message for unknown device, wrong token and a token of another device: the difference
# would let an attacker enumerate device ids (issue: no enumeration oracle).
BAD_CREDENTIALS = "unknown device or wrong enrollment token"


@dataclass(frozen=True, slots=True)
class Authorization:
    """A grant plus what issuance must consume or supersede, produced by one authorize_* call."""

    grant: Grant
    token_hash: str | None = None
    supersedes_serial: int | None = None
    actor: str = "device"
    # The token was already spent: only a retry of that very enrollment may be answered.
    retry_of_used_token: bool = False


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the client gets: its certificate, then the issuing CA, as DER (the reply's form)."""

    chain_der: tuple[bytes, ...]

    @property
    def certificate(self) -> x509.Certificate:
        """The issued certificate, parsed (on demand: the reply needs only the DER)."""
        return x509.load_der_x509_certificate(self.chain_der[0])

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return tuple(x509.load_der_x509_certificate(d) for d in self.chain_der)


@dataclass(frozen=True, slots=True)
class PendingEnrollment:
    """Signed, not yet recorded: `enrollment` may be returned only once `issuance` commits."""

    issuance: Issuance
    enrollment: Enrollment


def _template_mismatch(exc: TemplateMismatch) -> None:
    log.warning("%s; issuing with cryptography's builder instead (slower, same certificates)", exc)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Chooses the profile (certificate lifetime, backdating) of one device's next certificate.
ProfileChooser = Callable[[DeviceId], DeviceProfile]


class EnrollmentService:
    """`profile` is the profile of every certificate issued, unless `profile_for` is given: then
    it is asked, at each issuance, for the profile of that device (a per-device lifetime)."""

    def __init__(
        self,
        registry: Registry,
        issuer: Issuer,
        profile: DeviceProfile,
        profile_for: ProfileChooser | None = None,
        manufacturers: Callable[[], Mapping[str, x509.Certificate]] | None = None,
    ) -> None:
        self.registry = registry
        # The manufacturer CAs trusted for birth certificates, by name, as they are now
        # (manufacturers.TrustedManufacturers.current); None trusts none (no IDevID).
        self.manufacturers = manufacturers
        # Set by the server (start_server): unused tokens in memory, so that a first
        # enrollment skips the registry read; None reads the registry every time.
        self.tokens: TokenIndex | None = None
        self.profile = profile
        self.profile_for = profile_for
        # The previous issuing CAs still live (after a rollover: home.issuers): their
        # certificates still renew, onto the current issuer.
        self.previous_issuers: tuple[x509.Certificate, ...] = ()
        self.use_issuer(issuer)

    def use_issuer(self, issuer: Issuer) -> None:
        """Sign every certificate from now on with `issuer` (a rollover, picked up live)."""
        self.issuer = issuer
        self._issuer_der = issuer.cert.public_bytes(serialization.Encoding.DER)
        self._issuer_key_id = key_id(issuer.cert)
        # The profile of pki/profile.py, encoded from a template that proved itself against
        # the builder (pki/template.py); the builder itself if it did not.
        self._certificates = device_certificates(issuer, _template_mismatch)

    # --- authorization -----------------------------------------------------------------
    def authorize_token(self, username: str, token: str, now: datetime) -> Authorization:
        """First enrollment (RFC 7030 3.2.3 HTTP Basic): device id + one-time token."""
        try:
            device_id = DeviceId.parse(username)
        except InvalidIdentifier:
            raise AuthenticationFailed(BAD_CREDENTIALS) from None
        digest = token_hash(token)
        tokens = self.tokens
        if tokens is not None:
            role = tokens.take(device_id.value, digest, now)
            if role is not None:
                # Vouched for by the index; the commit re-checks token and device (see
                # enroll_server.enrollment.token_index), and `settle` reports what it refuses.
                return Authorization(Grant(device_id, role), token_hash=digest)
        try:
            # One read for token and device.
            holder = self.registry.check_token_holder(device_id, digest, now)
        except TokenRejected as exc:
            if exc.reason in ("unknown", "wrong-device"):
                raise AuthenticationFailed(BAD_CREDENTIALS) from None
            if exc.reason == "used":
                device = self.registry.get_device(device_id)
                if device is not None and device.state is DeviceState.ACTIVE:
                    return Authorization(
                        Grant(device_id, device.role),
                        token_hash=digest,
                        retry_of_used_token=True,
                    )
            # The caller proved knowledge of the token, so saying why it fails leaks nothing.
            raise AuthenticationFailed(f"enrollment token {exc.reason}") from None
        if holder.state in (DeviceState.REVOKED, DeviceState.SUSPENDED):
            raise device_inactive(device_id.value, holder.state.value)
        if tokens is not None:
            tokens.unknown_token_seen()  # a batch created since the index last read, likely
        return Authorization(Grant(device_id, holder.role), token_hash=digest)

    def authorize_certificate(self, cert: x509.Certificate, now: datetime) -> Authorization:
        """Re-enrollment (RFC 7030 4.2.2) with the current certificate, already TLS-verified.

        TLS proved possession of the key; here: the certificate must be signed by our issuing
        CA and be, byte for byte (fingerprint), one the registry recorded for the identity its
        CN names (pki.client_identity, the broker's check too), unexpired, with clientAuth; the
        identity must be active and the certificate its current one (or that one's unused
        fallback: registry.certificates).
        """
        # Our issuing CA's signature: the EST listener's TLS layer also trusts manufacturer
        # CAs (IDevID bootstrap), so its chain check does not say the certificate is ours.
        if not any(issued_by(cert, ca) for ca in (self.issuer.cert, *self.previous_issuers)):
            raise Forbidden("client certificate was not issued by this CA's issuing CA")
        record = self.registry.get_certificate(cert.serial_number)
        cn = common_name(cert)
        try:
            device = self.registry.get_device(DeviceId(cn)) if cn is not None else None
        except InvalidIdentifier:
            device = None
        identity = check_client_certificate(cert, device, record, now)
        if isinstance(identity, IdentityRefusal):
            raise Forbidden(f"client {identity.detail}")
        assert device is not None and record is not None  # a ClientIdentity has both
        if device.state is not DeviceState.ACTIVE:
            raise device_inactive(record.device_id.value, device.state.value)
        if record.status is CertStatus.ON_HOLD:
            raise DeviceSuspended(record.device_id.value)
        if record.status is CertStatus.REVOKED:
            # The identity is fine, this certificate is not: revoked on its own, or cut off
            # because a newer certificate of the identity took over (superseded).
            reason = record.revocation_reason
            advice = (
                "renew with the identity's newest certificate"
                if reason == "superseded"
                else "the identity needs a re-key (fleetpki device rekey)"
            )
            raise Forbidden(
                f"certificate {record.serial:x} of {record.device_id} is revoked "
                f"({reason}): {advice}"
            )
        # Only the newest certificate renews, or its fallback (status superseded): the one
        # it was renewed from, while it has never been used. The device may have lost it to a
        # power cut before storing it; that renewal then supersedes the unused one. The
        # registry re-checks this when it records the renewal (registry.certificates).
        return Authorization(
            Grant(record.device_id, device.role),
            supersedes_serial=cert.serial_number,
        )

    def authorize_bootstrap_certificate(
        self, cert: x509.Certificate, now: datetime
    ) -> Authorization:
        """simpleenroll over mTLS with a factory birth certificate (IDevID, IEEE 802.1AR).

        TLS proved possession of the birth key and a chain to some loaded root; here: the
        certificate must be signed by a manufacturer CA trusted now (`manufacturers`, given by
        the server: H/manufacturers/*/ca.pem as the files are at this call, so removing a CA
        file cuts it off without a restart), by the very manufacturer its lot was made with,
        name a device (CN = serialNumber = device id) of an IDevID batch, and be made for that
        very lot (OU = batch id). The grant is for that device id only, so an IDevID can enroll
        only its own device. A revoked lot (batch revoke) or device is refused. An enrolled
        device may bootstrap again (factory reset, as BRSKI intends): every older certificate
        of it is cut off when the new one is recorded (registry.certificates), as for a token.
        """
        trusted = self.manufacturers() if self.manufacturers is not None else {}
        try:
            birth = check_birth_certificate(cert, list(trusted.values()), now)
        except BirthCertificateRejected as exc:
            raise Forbidden(exc.reason) from None
        device = self.registry.get_device(birth.device_id)
        batch = None
        if device is not None and device.batch_id is not None:
            batch = self.registry.get_batch(device.batch_id)
        if device is None or batch is None or batch.kind is not BatchKind.IDEVID:
            raise Forbidden(f"birth certificate of {birth.device_id}: no such IDevID device")
        if batch.batch_id != birth.lot:
            raise Forbidden(f"birth certificate of {birth.device_id} was made for another lot")
        # The lot is bound to the manufacturer it was made with (batch create --manufacturer):
        # another trusted factory cannot enroll it by writing its lot id into the OU.
        # Lots recorded before schema 7 name none and take any trusted manufacturer.
        if batch.manufacturer is not None and trusted.get(batch.manufacturer) != birth.manufacturer:
            raise Forbidden(
                f"birth certificate of {birth.device_id} was not signed by manufacturer "
                f"{batch.manufacturer}, whose lot {batch.batch_id} it names"
            )
        if device.state in (DeviceState.REVOKED, DeviceState.SUSPENDED):
            raise device_inactive(device.device_id.value, device.state.value)
        return Authorization(Grant(device.device_id, device.role), actor="device-idevid")

    # --- issuance ----------------------------------------------------------------------
    def enroll(self, csr_der: bytes, auth: Authorization, now: datetime) -> Enrollment:
        """Check the CSR against the grant, sign, commit to the registry, then return.

        The certificate is committed (and the token consumed in the same transaction) before
        it leaves this function; if the commit fails the certificate is discarded unseen.
        """
        outcome = self.issue(csr_der, auth, now)
        if isinstance(outcome, Enrollment):
            return outcome
        return self.settle(outcome, self.registry.record_issuances([outcome.issuance])[0])

    def issue(
        self, csr_der: bytes, auth: Authorization, now: datetime
    ) -> PendingEnrollment | Enrollment:
        """Check the CSR and sign: the certificate, not yet recorded (or a replayed one).

        The caller must record `issuance` (record_issuances, possibly batched with others) and
        pass the outcome to `settle` before anything reaches the client; an Enrollment is a
        retry answered with the certificate already recorded, nothing to commit.
        """
        try:
            approved = check_csr(load_csr(csr_der), auth.grant, csr_der)
        except CsrRejected as exc:
            raise BadRequest(exc.reason) from exc
        if auth.retry_of_used_token:
            return self._replay(approved.public_key, auth.grant.device_id, now)
        device_id = auth.grant.device_id
        # One attribute test on the hot path when no per-device profile is configured.
        profile = self.profile if self.profile_for is None else self.profile_for(device_id)
        try:
            signed = self._certificates.issue(
                approved.public_key, device_id, now, profile, auth.grant.role
            )
        except SignerError as exc:
            # The CA key's token is unreachable (removed, session lost) or signed wrongly:
            # nothing is recorded and the token is not used, so the device just asks again.
            raise Unavailable(f"{exc}; nothing was issued, try again", SIGNER_RETRY_AFTER) from exc
        # Encoded once: the fingerprint, the registry's PEM and the reply all derive from it.
        der = signed.der
        record = IssuedCertificate(
            serial=signed.serial,
            device_id=device_id,
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_before=signed.not_before,
            not_after=signed.not_after,
            pem=certificate_pem(der),
            issuer_key_id=self._issuer_key_id,
        )
        return PendingEnrollment(
            Issuance(record, auth.token_hash, auth.supersedes_serial, now, auth.actor),
            Enrollment((der, self._issuer_der)),
        )

    def settle(self, pending: PendingEnrollment, refused: RegistryError | None) -> Enrollment:
        """The enrollment once its issuance is recorded; the client's error if it was refused.

        Every recorded issuance passes here (single or batched commit): its one log line, which
        names the certificate and never the token, the CSR or a key.
        """
        if refused is None:
            issuance = pending.issuance
            log.info(
                "%s: device %s, serial %x, not after %s",
                "renewed" if issuance.supersedes_serial is not None else "enrolled",
                issuance.cert.device_id,
                issuance.cert.serial,
                issuance.cert.not_after.isoformat(timespec="seconds"),
            )
            return pending.enrollment
        if isinstance(refused, TokenRejected):
            if refused.reason in ("unknown", "wrong-device"):
                # The token went away meanwhile (reissued): same words as authorize_token.
                raise AuthenticationFailed(BAD_CREDENTIALS) from refused
            if refused.reason == "used":
                # Another request spent the token first (a concurrent one, or, behind the token
                # index's back, one served by another process). If that was this very
                # enrollment (same key, its reply lost), the device gets the certificate it was
                # issued, as authorize_token's registry read would have answered; else "used".
                issuance = pending.issuance
                try:
                    return self._replay(
                        pending.enrollment.certificate.public_key(),  # type: ignore[arg-type]
                        issuance.cert.device_id,
                        issuance.now,
                    )
                except AuthenticationFailed as exc:
                    raise exc from refused
            raise AuthenticationFailed(f"enrollment token {refused.reason}") from refused
        if isinstance(refused, DeviceNotActive):
            # Revoked or suspended between authorization and commit.
            raise device_inactive(str(refused.device_id), refused.state) from refused
        if isinstance(refused, CertificateNotCurrent):
            # Cut off between authorization and commit (its successor was used meanwhile).
            raise Forbidden(f"{refused}: renew with the identity's newest certificate") from refused
        raise refused

    def _replay(self, public_key: PublicKey, device_id: DeviceId, now: datetime) -> Enrollment:
        """Answer a retried simpleenroll whose first reply was lost, without issuing again.

        A device that timed out waiting for its certificate retries with the same token and
        key; without this, the spent token would strand it until an operator reissues one
        (seen under load in the simulator). The CSR's signature proved possession of the key,
        so returning the certificate already issued for that key hands out nothing new; a
        different key, or a retry after RETRY_WINDOW, is still "token used".
        """
        for record in self.registry.certificates_of(device_id):
            if record.status is not CertStatus.ACTIVE or now - record.issued_at > RETRY_WINDOW:
                continue
            cert = x509.load_pem_x509_certificate(record.pem.encode())
            if cert.public_key() == public_key:
                der = cert.public_bytes(serialization.Encoding.DER)
                return Enrollment((der, self._issuer_der))
        raise AuthenticationFailed("enrollment token used")


def certificate_pem(der: bytes) -> str:
    """RFC 7468 PEM of a DER certificate, exactly as cryptography writes it (64-column lines)."""
    text = base64.b64encode(der).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"
