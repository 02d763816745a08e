"""The admission gate: feeds the pure connect decision with the peer certificate and registry."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from cryptography import x509

from enroll_server.broker.policy import (
    Admission,
    CertificateView,
    DeviceView,
    KeepalivePolicy,
    Refusal,
    RefusalReason,
    check_will,
    decide_connect,
)
from enroll_server.pki.client_identity import fingerprint
from fleetpki.identity import DeviceId, is_valid_id

log = logging.getLogger(__name__)


class CertificateRecordView(CertificateView, Protocol):
    @property
    def fallback_serial(self) -> int | None: ...


class RegistryReader(Protocol):
    """What admission needs of the registry (enroll_server.registry's Registry has it)."""

    def get_device(self, device_id: DeviceId) -> DeviceView | None: ...
    def get_certificate(self, serial: int) -> CertificateRecordView | None: ...
    def settle_certificate(
        self, serial: int, *, now: datetime, actor: str, wait: bool = True
    ) -> list[int]: ...


def _registry_failures() -> tuple[type[Exception], ...]:
    failures: list[type[Exception]] = [sqlite3.Error, OSError]
    try:
        from enroll_server.registry.errors import RegistryError
    except ImportError:  # pragma: no cover - the registry package is part of the server extra
        pass
    else:
        failures.append(RegistryError)
    return tuple(failures)


class AdmissionGate:
    """Decides each CONNECT from the certificate the TLS layer verified and the registry."""

    def __init__(
        self,
        registry: RegistryReader,
        keepalive: KeepalivePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self._registry = registry
        self._keepalive = keepalive
        self._clock = clock
        self._failures = _registry_failures()

    @property
    def keepalive(self) -> KeepalivePolicy:
        return self._keepalive

    def admit(
        self,
        client_id: str | None,
        cert_der: bytes | None,
        will_topic: str | None,
        keepalive: int,
    ) -> Admission | Refusal:
        cert = x509.load_der_x509_certificate(cert_der) if cert_der else None
        now = self._clock()
        device = None
        record = None
        if cert is not None and client_id is not None and is_valid_id(client_id):
            try:
                device = self._registry.get_device(DeviceId(client_id))
                record = self._registry.get_certificate(cert.serial_number)
            except self._failures as exc:
                log.warning("registry look-up for %s failed: %s", client_id, exc)
                return Refusal(RefusalReason.REGISTRY_UNAVAILABLE, f"registry unavailable: {exc}")
        decision = decide_connect(
            client_id,
            cert,
            device,
            record,
            now,
            fingerprint_sha256=fingerprint(cert_der) if cert_der else None,
        )
        if isinstance(decision, Refusal):
            return decision
        refused = check_will(decision, will_topic) or self._keepalive.check(keepalive)
        if refused is not None:
            return refused
        if record is not None and record.fallback_serial is not None:
            self._settle(decision, now)
        return decision

    def _settle(self, admission: Admission, now: datetime) -> None:
        """The first use of a renewed certificate: its fallback (the certificate it was renewed
        from) is cut off everywhere (registry.settle_certificate). Done without waiting for
        the write lock: if another writer holds it, the next connect or renewal does it."""
        try:
            cut = self._registry.settle_certificate(
                admission.serial, now=now, actor="broker", wait=False
            )
        except self._failures as exc:
            log.info("superseding the fallback of %s left for later: %s", admission.identity, exc)
            return
        if cut:
            log.info(
                "%s connected with its renewed certificate %x; superseded %s",
                admission.identity,
                admission.serial,
                ", ".join(f"{s:x}" for s in cut),
            )
