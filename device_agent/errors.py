"""The device agent's error tree: one class per failure, each carrying the offending data."""

from __future__ import annotations

from pathlib import Path


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """agent.toml is missing, unreadable or has a bad value; names the file and the key."""

    def __init__(self, path: Path, key: str | None, why: str) -> None:
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {why}")
        self.path = path
        self.key = key
        self.why = why


class KeystoreError(AgentError):
    """The on-disk identity (key, certificate, state file) cannot be used as it is."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


class KeyUnreadable(KeystoreError):
    """The private key file exists but cannot be read or parsed."""


class StateCorrupt(KeystoreError):
    """The certificate or state file is damaged or does not match its key."""


class CertificateRejected(AgentError):
    """A certificate returned by the server fails our checks (wrong key, name or chain)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"certificate from the enrollment server rejected: {why}")
        self.why = why


class EstError(AgentError):
    """Base of failures talking to the EST server."""


class EstUnavailable(EstError):
    """Network error, timeout or 5xx: worth retrying with backoff."""

    def __init__(self, url: str, why: str, status: int | None = None) -> None:
        super().__init__(f"EST server unavailable at {url}: {why}")
        self.url = url
        self.why = why
        self.status = status


class TlsVerificationFailed(EstError):
    """The server's certificate does not verify against the trust anchor (never bypassed)."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(
            f"TLS verification of {url} failed against the trust anchor: {why}; "
            "refusing to talk to an unverified server"
        )
        self.url = url
        self.why = why


class EstRetryLater(EstError):
    """202 Accepted: the request is pending (RFC 7030 4.2.3); ask again after `retry_after`."""

    def __init__(self, url: str, retry_after: float) -> None:
        super().__init__(f"{url}: request accepted but pending; retry in {retry_after:.0f} s")
        self.url = url
        self.retry_after = retry_after


class EstRejected(EstError):
    """A 4xx answer: the server refused and said why; not retried blindly.

    `code` is the machine-readable `Fleetpki-Error` code (fleetpki.error_codes), or None from
    a server that sends none; `reason` is the one line for people.
    """

    def __init__(self, url: str, status: int, reason: str, code: str | None = None) -> None:
        super().__init__(f"EST server refused ({status}) at {url}: {reason}")
        self.url = url
        self.status = status
        self.reason = reason
        self.code = code


class DeviceRevoked(EstRejected):
    """The service says the device is revoked (`device-revoked`): final, the agent stops."""


class DeviceSuspended(EstRejected):
    """The service says the device is suspended (`device-suspended`): reversible, so the
    agent waits (long backoff) and carries on once the operator resumes it."""


class EstProtocolError(EstError):
    """The server answered something that is not a valid EST response."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"bad EST response from {url}: {why}")
        self.url = url
        self.why = why


class BrokerRefused(AgentError):
    """The MQTT broker refused this identity (CONNACK 4/5 or a revoked-certificate TLS alert)."""

    def __init__(self, host: str, port: int, why: str, code: int | None = None) -> None:
        super().__init__(f"MQTT broker {host}:{port} refused the device: {why}")
        self.host = host
        self.port = port
        self.why = why
        self.code = code


class NeedsRebootstrap(AgentError):
    """No usable certificate and no token: only an operator with a new token can help."""

    def __init__(self, why: str, token_file: Path) -> None:
        super().__init__(
            f"{why}; to recover, ask the operator for a new enrollment token, write it to "
            f"{token_file} and run `fleetpki-agent enroll` (or restart the agent)"
        )
        self.why = why
        self.token_file = token_file
