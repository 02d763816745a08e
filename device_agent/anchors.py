"""Trust anchors: the roots the device trusts (ca.pem), and the one way a new root gets in.

A root rollover (README, "Root rollover") publishes, in /cacerts, the new self-signed root R2
and a cross-certificate R1 -> R2: R2's subject and public key, issued and signed by the old
root R1 (the "OldWithNew" certificate of RFC 4210 4.4). A device that trusts R1 adopts R2 only
through that certificate, checked here against a root it already trusts: a self-signed
certificate alone proves nothing (anyone can make one), whoever served it. The device never
drops an anchor because a server said so; the old root stays in ca.pem next to the new one
(an expired root builds no path, so it is harmless once R1 expires).

Pure: certificates and the time in, the decision out; only `add_anchors` writes a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.keys import same_public_key
from fleetpki.atomic_file import PUBLIC_MODE, atomic_writer


@dataclass(frozen=True)
class Adopted:
    """A new root and the cross-certificate by which a current anchor vouches for it."""

    root: x509.Certificate
    cross: x509.Certificate
    anchor: x509.Certificate


@dataclass(frozen=True)
class Refused:
    """A new self-signed root offered without a cross-certificate we can verify, and why."""

    root: x509.Certificate
    why: str


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex: how a log line names a root unambiguously."""
    return cert.fingerprint(hashes.SHA256()).hex()


def directly_issued(cert: x509.Certificate, parent: x509.Certificate) -> bool:
    """`parent`'s name is `cert`'s issuer and `parent`'s key verifies `cert`'s signature."""
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject = issuer and a signature by its own key: a root. A cross-certificate of a root
    rollover is self-issued (same names) but signed by the other root's key."""
    return cert.subject == cert.issuer and directly_issued(cert, cert)


def _within(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    """CA:TRUE (RFC 5280 4.2.1.9) and, if KeyUsage is present, keyCertSign (4.2.1.3)."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return True


def cross_certificate_problem(
    root: x509.Certificate, cross: x509.Certificate, anchor: x509.Certificate, now: datetime
) -> str | None:
    """Why `cross` does not make `anchor` vouch for `root` at `now` (None: it does).

    The cross-certificate must name the root (same subject), carry the root's public key, be
    issued by the anchor (its issuer name, and a signature that verifies with the anchor's
    key), be a CA certificate, and be valid now, as must the anchor and the root.
    """
    if cross.subject != root.subject:
        return f"its subject {cross.subject.rfc4514_string()!r} is not the root's"
    if not same_public_key(cross.public_key(), root.public_key()):
        return "it certifies another public key than the root's"
    if cross.issuer != anchor.subject:
        return f"its issuer {cross.issuer.rfc4514_string()!r} is not a current trust anchor"
    if not directly_issued(cross, anchor):
        return "its signature does not verify with the trust anchor's key"
    if not _is_ca(cross):
        return "it is not a CA certificate (CA:TRUE with keyCertSign)"
    for what, cert in (("the cross-certificate", cross), ("the trust anchor", anchor)):
        if not _within(cert, now):
            return (
                f"{what} is not valid now ({cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()})"
            )
    return None


def new_roots(
    offered: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], now: datetime
) -> tuple[list[Adopted], list[Refused]]:
    """The self-signed roots in `offered` (a /cacerts answer) that we do not trust yet: those a
    cross-certificate in `offered`, issued by one of `anchors`, vouches for, and the others
    with the reason each was refused.

    A root no newer (notBefore) than every anchor is the past, not a move forward: after a
    rollover /cacerts also carries the old root and its new-signed-old certificate (RFC 7030
    4.1.3 asks for OldWithOld, OldWithNew and NewWithOld), which a device that already
    trusts only the new root has no reason to adopt. It is skipped, not logged.
    """
    adopted: list[Adopted] = []
    refused: list[Refused] = []
    for root in offered:
        if root in anchors or not is_self_signed(root):
            continue
        if all(root.not_valid_before_utc <= a.not_valid_before_utc for a in anchors):
            continue
        try:
            verdict = _vouched(root, offered, anchors, now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # A malformed extension or key somewhere in what the server sent: not a root.
            verdict = f"unreadable certificate: {exc}"
        if isinstance(verdict, Adopted):
            adopted.append(verdict)
        else:
            refused.append(Refused(root, verdict))
    return adopted, refused


def _vouched(
    root: x509.Certificate,
    offered: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: datetime,
) -> Adopted | str:
    """The cross-certificate in `offered` by which an anchor vouches for `root`, else why not."""
    if not _is_ca(root) or not _within(root, now):
        return "it is not a CA certificate valid now"
    why = "no cross-certificate from a current trust anchor accompanies it"
    for cross in (c for c in offered if c.subject == root.subject and c is not root):
        for anchor in anchors:
            problem = cross_certificate_problem(root, cross, anchor, now)
            if problem is None:
                return Adopted(root, cross, anchor)
            if cross.issuer == anchor.subject or why.startswith("no "):
                why = f"the cross-certificate is refused: {problem}"
    return why


def read_anchors(path: Path) -> list[x509.Certificate]:
    """The certificates in the trust store file (PEM); raises OSError or ValueError."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def add_anchors(path: Path, roots: Sequence[x509.Certificate]) -> None:
    """Append `roots` to the trust store, atomically: a power cut leaves the old file or the
    new one, never a half-written anchor (fleetpki.atomic_file). What the file held before
    stays byte for byte; a root it already holds (another agent sharing the file added it
    since we read it) is not added twice."""
    old = path.read_bytes()
    held = x509.load_pem_x509_certificates(old) if b"-----BEGIN" in old else []
    missing = [r for r in roots if r not in held]
    if not missing:
        return
    new = old if old.endswith(b"\n") or not old else old + b"\n"
    new += b"".join(r.public_bytes(Encoding.PEM) for r in missing)
    with atomic_writer(path, PUBLIC_MODE) as fh:
        fh.write(new)
