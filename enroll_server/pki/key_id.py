"""A CA's key identifier in lowercase hex: how the home, the registry and the CRL routes name
an issuing CA when several live at once (after a rollover)."""

from __future__ import annotations

from cryptography import x509


def key_id(cert: x509.Certificate) -> str:
    """A CA certificate's SubjectKeyIdentifier, lowercase hex (RFC 5280 4.2.1.2): also the
    AuthorityKeyIdentifier (4.2.1.1) of every certificate it signs."""
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex()
