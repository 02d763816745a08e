"""The error tree of the pure PKI layer; each error carries the offending data."""

from __future__ import annotations


class PkiError(Exception):
    """Base of every error raised by enroll_server.pki."""


class UnsupportedKey(PkiError):
    """A key type, curve or size that our certificate policy does not accept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CsrRejected(PkiError):
    """A CSR that fails the CSR policy; `reason` is one line for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadPassphrase(PkiError):
    """A CA key file that cannot be decrypted with the passphrase given."""

    def __init__(self, what: str) -> None:
        super().__init__(f"cannot decrypt {what}: wrong passphrase or corrupt key file")
        self.what = what


class BirthCertificateRejected(PkiError):
    """A factory birth certificate (IDevID) that does not authorize an enrollment.

    `reason` is one line that names no secret; the service turns it into HTTP 403.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
