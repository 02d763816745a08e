"""An issuing CA certificate signed elsewhere (the operator's PKI): the checks before we use it.

Each check names what is wrong in one sentence, so the operator can take it to whoever runs
the PKI; nothing here writes anything (home/external_root.py installs what passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import KeyType, PublicKey, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from fleetpki.identity import DeviceId

# The name of the throwaway device certificate `probe_device_path` signs and discards.
PROBE_DEVICE = DeviceId("fleetpki-import-probe")


class IssuingRejected(PkiError):
    """An issuing CA certificate (or its chain) we will not use; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IssuingChain:
    """The issuing CA certificate, the CAs between it and the root, and the root."""

    issuing: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    root: x509.Certificate

    def pem(self) -> bytes:
        """issuing, intermediates, root: what relying parties (brokers) load as CA file."""
        certs = (self.issuing, *self.intermediates, self.root)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _who(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert: x509.Certificate, role: str, *, signs_crls: bool) -> x509.BasicConstraints:
    """RFC 5280 4.2.1.9: only CA:TRUE may sign certificates; 4.2.1.3: keyCertSign (and
    cRLSign for the CA that signs our CRLs) when keyUsage is there, and it must be there for
    the issuing CA, which signs both."""
    constraints = _basic_constraints(cert)
    if constraints is None or not constraints.ca:
        raise IssuingRejected(f"{role} {_who(cert)} is not a CA (basicConstraints CA:TRUE missing)")
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    needed = {"keyCertSign": True, "cRLSign": signs_crls}
    if usage is None:
        if signs_crls:
            raise IssuingRejected(
                f"{role} {_who(cert)} has no keyUsage: it needs keyCertSign and cRLSign"
            )
        return constraints
    have = {"keyCertSign": usage.key_cert_sign, "cRLSign": usage.crl_sign}
    missing = [name for name, want in needed.items() if want and not have[name]]
    if missing:
        raise IssuingRejected(f"{role} {_who(cert)} keyUsage lacks {' and '.join(missing)}")
    return constraints


def _check_validity(cert: x509.Certificate, role: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise IssuingRejected(
            f"{role} {_who(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise IssuingRejected(
            f"{role} {_who(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _signed_by(cert, cert)


def _path_to_root(
    issuing: x509.Certificate, chain: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """issuing, then each issuer found in `chain` by name and signature, up to a self-signed
    root (RFC 5280 6.1: the path ends at a trust anchor; here the root the operator gives)."""
    path = [issuing]
    while not _self_signed(path[-1]):
        current = path[-1]
        named = [c for c in chain if c.subject == current.issuer and c not in path]
        if not named:
            raise IssuingRejected(
                f"no certificate in the chain is the issuer {current.issuer.rfc4514_string()} "
                f"of {_who(current)}: give CHAIN with every CA up to the self-signed root"
            )
        issuer = next((c for c in named if _signed_by(current, c)), None)
        if issuer is None:
            raise IssuingRejected(
                f"the signature of {_who(current)} does not verify with the key of "
                f"{_who(named[0])} (a CA of that name, but not the one that signed it)"
            )
        path.append(issuer)
    return path


def check_issuing_certificate(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    public_key: PublicKey,
    now: datetime,
) -> IssuingChain:
    """`cert` is our issuing CA (key `public_key`) under a root in `chain`, usable at `now`.

    IssuingRejected naming the first thing wrong: not our key; not a CA with keyCertSign +
    cRLSign; not valid at `now`; no path of verified signatures up to a self-signed root in
    `chain`; a CA above it whose pathLen leaves no room for it; a CA of the path not valid.
    """
    if cert.public_key() != public_key:
        raise IssuingRejected(
            f"the certificate {_who(cert)} is not for the issuing CA key this home made "
            "(its public key differs): was it issued for another request?"
        )
    # pathLen on the issuing CA itself may be anything (>= 0): devices are end entities,
    # which pathLen does not count (RFC 5280 4.2.1.9).
    _check_ca(cert, "the issuing certificate", signs_crls=True)
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        # RFC 5280 4.2.1.2: a CA certificate MUST carry it; our certificates' AKI copies it.
        raise IssuingRejected(
            f"the issuing certificate {_who(cert)} has no subjectKeyIdentifier"
        ) from None
    _check_validity(cert, "the issuing certificate", now)
    if _self_signed(cert):
        raise IssuingRejected(
            f"the certificate {_who(cert)} is self-signed: a root, not an issuing CA "
            "signed by your PKI"
        )
    path = _path_to_root(cert, chain)
    for depth, ca in enumerate(path[1:], start=1):
        role = "the root" if depth == len(path) - 1 else "the intermediate CA"
        constraints = _check_ca(ca, role, signs_crls=False)
        _check_validity(ca, role, now)
        # RFC 5280 4.2.1.9 / 6.1.4 (l, m): pathLen n allows n CA certificates below this one;
        # the issuing CA is the depth-th below it. Checked at the root too, as OpenSSL does.
        if constraints.path_length is not None and constraints.path_length < depth:
            raise IssuingRejected(
                f"{role} {_who(ca)} has pathLen {constraints.path_length}: it allows "
                f"{constraints.path_length} CA(s) below it, and the issuing CA is {depth} "
                "below it; devices under it would not verify"
            )
    return IssuingChain(cert, tuple(path[1:-1]), path[-1])


def probe_device_path(chain: IssuingChain, issuer: Issuer, now: datetime) -> None:
    """Sign a throwaway device certificate with our issuing CA (`issuer`: chain.issuing and
    its key) and validate it as the agent does (cryptography's client verifier: RFC 5280
    path validation plus its profile, e.g. EKU on the CAs above), anchored at the root.
    Catches what the structural checks do not: an intermediate whose extendedKeyUsage leaves
    out clientAuth, an unknown critical extension, name constraints. IssuingRejected if the
    certificates our devices would get do not verify; the probe is never stored or served."""
    leaf = build_device_certificate(
        generate_key(KeyType.EC_P256).public_key(), PROBE_DEVICE, issuer, now, DeviceProfile()
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([chain.root]))
        .time(now)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, [chain.issuing, *chain.intermediates])
    except verification.VerificationError as exc:
        raise IssuingRejected(
            f"a device certificate under {_who(chain.issuing)} does not verify from the root "
            f"{_who(chain.root)} (as devices and brokers check it): {exc}"
        ) from None
