"""The issuing CA's own expiry: when `fleetpki serve` starts warning, and the metrics for it.

A CA certificate that expires invalidates every certificate under it (RFC 5280 6.1.3 (a)(2)
checks each certificate of the path for validity at the time of use), so the operator must
replace it well before its notAfter.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509

# Default lead time of the warning: room for a ceremony with an offline root and for devices
# to renew onto the new issuing CA.
DEFAULT_EXPIRY_WARNING = timedelta(days=180)


def expiry_warning(cert: x509.Certificate, now: datetime, warn_before: timedelta) -> str | None:
    """A warning naming the CA and its notAfter if it expires within `warn_before`, else None."""
    not_after = cert.not_valid_after_utc
    left = not_after - now
    if left > warn_before:
        return None
    subject = cert.subject.rfc4514_string()
    if left <= timedelta(0):
        return (
            f"the issuing CA {subject} expired at {not_after.isoformat()}: "
            "devices cannot renew under it"
        )
    return (
        f"the issuing CA {subject} expires at {not_after.isoformat()} "
        f"(in {left.days} days; [ca] expiry_warning = {warn_before.days} days): "
        "replace it before then, or devices cannot renew"
    )


def expiry_metrics(cert: x509.Certificate, now: datetime, warn_before: timedelta) -> str:
    """Prometheus lines: the issuing CA's notAfter and whether the warning is on (1) or not."""
    warning = 1 if expiry_warning(cert, now, warn_before) is not None else 0
    return (
        "# HELP fleetpki_issuing_ca_not_after_seconds When the issuing CA certificate "
        "expires (Unix time).\n"
        "# TYPE fleetpki_issuing_ca_not_after_seconds gauge\n"
        f"fleetpki_issuing_ca_not_after_seconds {cert.not_valid_after_utc.timestamp():.0f}\n"
        "# HELP fleetpki_issuing_ca_expiry_warning 1 once the issuing CA expires within "
        "[ca] expiry_warning.\n"
        "# TYPE fleetpki_issuing_ca_expiry_warning gauge\n"
        f"fleetpki_issuing_ca_expiry_warning {warning}\n"
    )
