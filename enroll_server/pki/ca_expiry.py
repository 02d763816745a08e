"""CA material that runs out (issuing CA notAfter, offline root CRL): warnings and metrics.

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


def root_crl_warning(
    crl: x509.CertificateRevocationList | None, now: datetime, warn_before: timedelta
) -> str | None:
    """An offline root's CRL (signed only at a ceremony): a warning when there is none or its
    nextUpdate is within `warn_before`. Relying parties that check the whole chain (RFC 5280
    6.3.3 (a): a CRL past its nextUpdate is not current) refuse every device after it."""
    fix = "sign the next one: fleetpki ca sign-root-crl --root DIR"
    if crl is None:
        return f"no root CRL to serve at /root.crl (H/ca/root.crl): {fix}"
    next_update = crl.next_update_utc
    if next_update is None or next_update - now > warn_before:
        return None
    if next_update <= now:
        return f"the root CRL's nextUpdate {next_update.isoformat()} has passed: {fix}"
    return (
        f"the root CRL's nextUpdate is {next_update.isoformat()} "
        f"(in {(next_update - now).days} days; [ca] root_crl_warning = {warn_before.days} "
        f"days): {fix}"
    )


def root_crl_metrics(
    crl: x509.CertificateRevocationList | None, now: datetime, warn_before: timedelta
) -> str:
    """Prometheus lines: the root CRL's nextUpdate (0 when none) and whether the warning is on."""
    warning = 1 if root_crl_warning(crl, now, warn_before) is not None else 0
    next_update = crl.next_update_utc if crl is not None else None
    return (
        "# HELP fleetpki_root_crl_next_update_seconds When the served root CRL's nextUpdate "
        "falls (Unix time; 0: none).\n"
        "# TYPE fleetpki_root_crl_next_update_seconds gauge\n"
        f"fleetpki_root_crl_next_update_seconds "
        f"{next_update.timestamp() if next_update is not None else 0:.0f}\n"
        "# HELP fleetpki_root_crl_warning 1 once the offline root's CRL is missing or its "
        "nextUpdate is within [ca] root_crl_warning.\n"
        "# TYPE fleetpki_root_crl_warning gauge\n"
        f"fleetpki_root_crl_warning {warning}\n"
    )
