"""The Agent: one device's lifecycle from factory bundle to a long-lived, self-renewing session.

    wait for a sane clock -> enroll (token or factory birth certificate) if there is no valid
    certificate -> MQTT session
    + telemetry loop + renewal loop (simplereenroll with a fresh key at ~2/3 of the lifetime,
    atomic swap, reconnect) -> stop on request, on refusal/revocation, or when the certificate
    expired and no token is there to re-bootstrap (an IDevID device re-bootstraps by itself).

A suspended device (the service's `device-suspended` code) does not stop: suspension is
reversible, so it waits, asking again with a long backoff, and carries on once resumed. The
broker's refusal (MQTT 3.1.1 CONNACK 5, or a revoked-certificate TLS alert for a certificate
on hold) does not say which, so the agent then asks the service (GET /device/status).

Asyncio-native and free of globals, so one process can run thousands (the simulator).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn

from cryptography import x509

from device_agent import __version__
from device_agent.backoff import Backoff
from device_agent.cancel import cancel_all
from device_agent.clock import clock_floor, is_sane
from device_agent.config import AgentConfig, BirthCredentials
from device_agent.errors import (
    BrokerRefused,
    CertificateRejected,
    ConfigError,
    DeviceRevoked,
    DeviceSuspended,
    EstProtocolError,
    EstRejected,
    EstRetryLater,
    EstUnavailable,
    KeystoreError,
    NeedsRebootstrap,
    TlsVerificationFailed,
)
from device_agent.events import AgentEvent, EventHandler
from device_agent.exit_codes import ExitCode
from device_agent.keystore import Identity, Keystore
from device_agent.mqtt_link import CommandHandler, DeliveredHandler, MqttLink
from device_agent.schedule import (
    attempt_timeout,
    is_expired,
    renewal_after_issue,
    retry_deadline_delay,
)
from device_agent.telemetry import TelemetryHook, telemetry_payload
from device_agent.tls import client_context
from fleetpki.clock import utc_now

if TYPE_CHECKING:
    from device_agent.est_client import EstClient
    from device_agent.keys import PrivateKey

# The EST client, the PKCS#7 / CSR code and key generation are imported on first use: an
# enrolled agent between two renewals (weeks) does not keep them resident. That is worth ~2 MiB
# of RSS on a Pi, a fifth of the agent's own footprint over the Python + OpenSSL floor.

log = logging.getLogger("fleetpki.agent")

# While waiting for the clock: how often to look, and how often to say so again.
CLOCK_POLL_S = 5.0
CLOCK_REPORT_S = 300.0
# Sleeps are chunked so that a wall-clock jump (NTP sync, suspend) is noticed within this.
MAX_SLEEP_S = 60.0
# A suspended device asks the service again after this, doubling up to
# `[enroll] suspended_retry_max`: suspensions are the operator's, and last minutes or days.
SUSPENDED_FIRST_S = 30.0


class AgentState(StrEnum):
    STARTING = "starting"
    WAITING_FOR_CLOCK = "waiting-for-clock"
    ENROLLING = "enrolling"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RENEWING = "renewing"
    SUSPENDED = "suspended"  # waiting for the operator to resume the device
    REVOKED = "revoked"
    REFUSED = "refused"
    EXPIRED = "expired"
    BROKEN = "broken"  # config or local state unusable
    STOPPED = "stopped"


class _StopRequested(Exception):
    """Raised inside the agent's loops when stop() was called."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class Agent:
    """One device. `await Agent(config).run()` returns an ExitCode; `stop()` ends it cleanly.

    `telemetry_hook()` adds application fields to each telemetry message; `on_command(payload)`
    (sync or async) receives what arrives on devices/<id>/commands. `clock` and `rng` exist for
    tests and the simulator; only this entry point reads the wall clock. `on_event(event)`
    receives an AgentEvent at each lifecycle step (enrolled, renewed, connected, disconnected,
    state change, retry); it runs in the agent's loop, so it must not block, and an exception
    it raises is logged (once) and otherwise ignored. `on_delivered(payload)` is called with
    each telemetry message the broker acknowledged (PUBACK), in the agent's loop: a delivery
    receipt (must not block; at-least-once, so a message may be reported twice).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        telemetry_hook: TelemetryHook | None = None,
        on_command: CommandHandler | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] | None = None,
        est_backoff: Backoff | None = None,
        mqtt_backoff: Backoff | None = None,
        suspended_backoff: Backoff | None = None,
        clock_poll: float = CLOCK_POLL_S,
        persist_status: bool = True,
        on_event: EventHandler | None = None,
        on_delivered: DeliveredHandler | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.telemetry_hook = telemetry_hook
        self.on_command = on_command
        self.rng = rng or random.Random()
        self.now = clock or utc_now
        self.est_backoff = est_backoff or Backoff(base=2.0, factor=2.0, cap=600.0)
        self.mqtt_backoff = mqtt_backoff or Backoff(base=1.0, factor=2.0, cap=120.0)
        cap = config.suspended_retry_max
        self.suspended_backoff = suspended_backoff or Backoff(
            base=min(SUSPENDED_FIRST_S, cap), factor=2.0, cap=cap
        )
        # A session (run) waits out a suspension; a one-shot `enroll` reports it and exits.
        self._wait_if_suspended = False
        self.clock_poll = clock_poll
        self.persist_status = persist_status
        self.on_event = on_event
        self.on_delivered = on_delivered
        self._event_hook_failed = False
        self.keystore = Keystore(config.state_dir)
        self._est: EstClient | None = None
        self._anchor_certs: list[x509.Certificate] | None = None
        self.identity: Identity | None = None
        self.link: MqttLink | None = None
        self.state = AgentState.STARTING
        self.last_error: str | None = None
        self.last_connected: datetime | None = None
        self.renewals = 0
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._started = time.monotonic()

    # -- public API ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask run()/enroll() to finish (returns ExitCode.OK); safe from signal handlers."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> ExitCode:
        """Enroll if needed, then keep the session and the certificate alive until stopped.

        A suspended device waits (state `suspended`) and carries on once resumed."""
        self._wait_if_suspended = True
        return await self._guard(self._run)

    async def enroll(self, *, force: bool = False) -> ExitCode:
        """Make sure a valid identity is stored (enrolling with the token or the factory
        birth certificate if needed); no MQTT.

        `force` re-enrolls even over a still-valid certificate: the recovery path of a revoked
        device the operator has re-admitted with a new token (or a factory reset of an IDevID
        device).
        """

        async def body() -> ExitCode:
            await self._ensure_identity(force=force)
            return ExitCode.OK

        self._wait_if_suspended = False

        return await self._guard(body)

    # -- outcome mapping -----------------------------------------------------------------------
    async def _guard(self, body: Callable[[], Any]) -> ExitCode:
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        try:
            code: ExitCode = await body()
            return code
        except _StopRequested:
            self._set_state(AgentState.STOPPED)
            log.info("%s: stopped", self.device_id)
            return ExitCode.OK
        except (ConfigError, KeystoreError) as exc:
            return self._finish(AgentState.BROKEN, ExitCode.CONFIG, str(exc))
        except TlsVerificationFailed as exc:
            return self._finish(AgentState.BROKEN, ExitCode.CONFIG, str(exc))
        except DeviceRevoked as exc:
            return self._finish(
                AgentState.REVOKED, ExitCode.REFUSED, f"device revoked: {exc.reason}; stopping"
            )
        except DeviceSuspended as exc:  # only from a one-shot command (enroll)
            return self._finish(
                AgentState.SUSPENDED,
                ExitCode.REFUSED,
                f"device suspended: {exc.reason}; `fleetpki-agent run` waits until the "
                "operator resumes it",
            )
        except BrokerRefused as exc:
            return self._finish(AgentState.REFUSED, ExitCode.REFUSED, f"{exc}; stopping")
        except EstRejected as exc:
            return self._finish(AgentState.REFUSED, ExitCode.REFUSED, f"{exc}; stopping")
        except NeedsRebootstrap as exc:
            return self._finish(AgentState.EXPIRED, ExitCode.REBOOTSTRAP, str(exc))

    def _finish(self, state: AgentState, code: ExitCode, message: str) -> ExitCode:
        # The one clear log line of a terminal state (issue: "stops hammering").
        self.last_error = message
        log.error("%s: %s (state %s, exit %d)", self.device_id, message, state, code)
        self._set_state(state)
        return code

    def _set_state(self, state: AgentState) -> None:
        if state is self.state:
            return
        self.state = state
        self._write_status()
        self._emit(AgentEvent.state_changed(state))

    def _emit(self, event: AgentEvent) -> None:
        """Hand `event` to on_event; the callback is the caller's code, so its failure must
        not end the device's session or its renewal."""
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            if not self._event_hook_failed:
                self._event_hook_failed = True
                log.exception(
                    "%s: on_event callback failed on a %s event; further failures are not logged",
                    self.device_id,
                    event.kind,
                )

    def _write_status(self) -> None:
        if not self.persist_status:
            return
        ident = self.identity
        status = {
            "device_id": str(self.device_id),
            "state": str(self.state),
            "since": _iso(self.now()),
            "pid": os.getpid(),
            "last_connected": _iso(self.last_connected),
            "last_error": self.last_error,
            "serial": ident.serial_hex if ident else None,
            "not_after": _iso(ident.not_after) if ident else None,
            "renewals": self.renewals,
        }
        try:
            self.keystore.write_status(status)
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.device_id, self.keystore.status_file, exc)

    @property
    def est(self) -> EstClient:
        if self._est is None:
            from device_agent.est_client import EstClient

            cfg = self.config
            self._est = EstClient(cfg.est_servers, cfg.trust_anchor, timeout=cfg.http_timeout)
        return self._est

    # -- waiting -------------------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake (raising _StopRequested) as soon as stop() is called."""
        assert self._stop is not None
        if self._stop.is_set():
            raise _StopRequested
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._stop.wait()
        except TimeoutError:
            return
        raise _StopRequested

    async def _sleep_until(self, when: datetime) -> None:
        while (left := (when - self.now()).total_seconds()) > 0:
            await self._sleep(min(left, MAX_SLEEP_S))

    def _check_anchor(self) -> None:
        """Fail early, as a config error, if TLS cannot load the trust anchor (checked with the
        ssl module, which uses it, so the idle path needs no certificate parsing)."""
        path = self.config.trust_anchor
        try:
            client_context(path)
        except OSError as exc:  # ssl.SSLError is an OSError too
            why = exc.strerror or getattr(exc, "reason", None) or str(exc)
            raise ConfigError(path, None, f"cannot load the trust anchor: {why}") from exc

    def _anchors(self) -> list[x509.Certificate]:
        """The trust anchors (every certificate in ca.pem: the bundle's root, and any root
        adopted since through a cross-certificate), for enrollment and renewal checks."""
        if self._anchor_certs is not None:
            return self._anchor_certs
        from device_agent.anchors import read_anchors

        path = self.config.trust_anchor
        try:
            certs = read_anchors(path)
        except OSError as exc:
            raise ConfigError(path, None, f"cannot read the trust anchor: {exc.strerror}") from exc
        except (ValueError, x509.InvalidVersion) as exc:
            raise ConfigError(path, None, f"not a PEM certificate: {exc}") from exc
        if not certs:
            raise ConfigError(path, None, "holds no certificate")
        self._anchor_certs = certs
        return certs

    async def _cacerts(self) -> list[x509.Certificate]:
        """GET /cacerts (over TLS verified against our anchors), checked against our anchors
        (RFC 7030 4.1.3). A new root that a current anchor cross-certifies in it becomes an
        anchor first (device_agent.anchors). Raises WireError if nothing chains."""
        from device_agent.est_wire import check_cacerts

        offered = await self.est.cacerts()
        self._adopt_roots(offered)
        return check_cacerts(offered, self._anchors())

    def _adopt_roots(self, offered: list[x509.Certificate]) -> None:
        """Root rollover (README, "Root rollover"): add to ca.pem each new root a current
        anchor vouches for with a cross-certificate; keep every current anchor; say so."""
        from device_agent.anchors import add_anchors, fingerprint, new_roots

        adopted, refused = new_roots(offered, self._anchors(), self.now())
        for no in refused:
            log.warning(
                "%s: /cacerts offers a new root %s (SHA-256 %s); not trusted: %s",
                self.device_id,
                no.root.subject.rfc4514_string(),
                fingerprint(no.root),
                no.why,
            )
        if not adopted:
            return
        path = self.config.trust_anchor
        try:
            add_anchors(path, [a.root for a in adopted])
        except (OSError, ValueError) as exc:  # not writable, or no longer PEM since we read it
            log.warning("%s: cannot add a trust anchor to %s: %s", self.device_id, path, exc)
            return
        self._anchor_certs = None
        for yes in adopted:
            log.info(
                "%s: new trust anchor %s (SHA-256 %s), cross-certified by %s, added to %s; "
                "the old anchors stay",
                self.device_id,
                yes.root.subject.rfc4514_string(),
                fingerprint(yes.root),
                yes.anchor.subject.rfc4514_string(),
                path,
            )

    async def _wait_for_clock(self, known_past: datetime) -> None:
        """A Pi without an RTC boots in 1970: judging certificates then would call every one
        'not yet valid'. Wait for NTP, saying what we wait for.

        `known_past` is a moment that has certainly passed: our certificate's notBefore or,
        before enrollment, the trust anchor's."""
        floor = clock_floor(known_past)
        reported = -CLOCK_REPORT_S
        while not is_sane(now := self.now(), floor):
            self._set_state(AgentState.WAITING_FOR_CLOCK)
            if time.monotonic() - reported >= CLOCK_REPORT_S:
                reported = time.monotonic()
                hint = await self.est.server_date()
                log.warning(
                    "%s: waiting for a sane clock: system time %s is before %s (a certificate's "
                    "notBefore or the agent's release); is NTP running?%s",
                    self.device_id,
                    now.isoformat(timespec="seconds"),
                    floor.isoformat(timespec="seconds"),
                    f" The enrollment server's clock says {hint.isoformat(timespec='seconds')}."
                    if hint
                    else "",
                )
            await self._sleep(self.clock_poll)

    # -- enrollment ----------------------------------------------------------------------------
    def _read_token(self) -> str | None:
        path = self.config.token_file
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, None, f"cannot read the enrollment token: {exc}") from exc
        if not token or "\n" in token:
            raise ConfigError(path, None, "the token file must hold exactly one non-empty line")
        return token

    def _delete_token(self) -> None:
        # The token is single-use; once the certificate is on disk it is only a liability.
        try:
            self.config.token_file.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(
                "%s: enrolled, but could not delete the used token %s: %s",
                self.device_id,
                self.config.token_file,
                exc.strerror,
            )

    async def _ensure_identity(self, *, force: bool = False) -> Identity:
        self.keystore.sweep()
        ident = self.keystore.load()
        self.identity = ident
        self._check_anchor()
        known_past = ident.not_before if ident else self._anchors()[0].not_valid_before_utc
        await self._wait_for_clock(known_past)
        now = self.now()
        if ident is not None and not force and not is_expired(ident.not_after, now):
            return ident
        if ident is None:
            situation = "the device has no certificate"
        elif force:
            situation = "re-enrollment was requested"
        else:
            situation = f"the certificate expired at {ident.not_after.isoformat()}"
        self.identity = await self._bootstrap(situation)
        return self.identity

    async def _bootstrap(self, situation: str) -> Identity:
        """First enrollment (or re-bootstrap) with the bundle's credential: the factory birth
        certificate if agent.toml names one, else the one-time token. `situation` says why
        (for the log, and for the error when there is no token)."""
        birth = self.config.idevid
        if birth is not None:
            if self.identity is not None:
                log.warning(
                    "%s: %s; re-bootstrapping with the birth certificate %s",
                    self.device_id,
                    situation,
                    birth.cert,
                )
            return await self._enroll_idevid(birth)
        token = self._read_token()
        if token is None:
            raise NeedsRebootstrap(f"{situation} and no enrollment token", self.config.token_file)
        if self.identity is not None:
            log.warning(
                "%s: %s; re-bootstrapping with the token in %s",
                self.device_id,
                situation,
                self.config.token_file,
            )
        return await self._enroll(token)

    async def _new_key(self) -> PrivateKey:
        from device_agent.keys import new_key

        return await new_key(self.config.key_type)

    def _accept(
        self,
        key: PrivateKey,
        certs: list[x509.Certificate],
        cas: list[x509.Certificate],
    ) -> list[x509.Certificate]:
        from device_agent.est_wire import WireError, check_issued, order_chain

        anchors = self._anchors()
        try:
            chain = order_chain(key, certs, cas, anchors)
            check_issued(chain, key, self.device_id, anchors, self.now())
        except WireError as exc:
            raise CertificateRejected(exc.why) from exc
        return chain

    def _store(self, key: PrivateKey, chain: list[x509.Certificate]) -> Identity:
        leaf = chain[0]
        due = renewal_after_issue(
            leaf.not_valid_before_utc, leaf.not_valid_after_utc, self.now(), self.rng
        )
        return self.keystore.store(key, chain, due)

    async def _enroll(self, token: str) -> Identity:
        """simpleenroll with the token; retries 202/5xx/network with backoff, never 401/403."""
        ident = await self._simpleenroll(
            lambda csr: self.est.simpleenroll(csr, self.device_id, token)
        )
        self._delete_token()
        return ident

    async def _enroll_idevid(self, birth: BirthCredentials) -> Identity:
        """simpleenroll over mutual TLS with the factory birth certificate (IEEE 802.1AR IDevID
        -> operational certificate). The birth pair stays where it is: it is the device's
        permanent factory identity, used again only to re-bootstrap, never for MQTT."""
        from device_agent.idevid import check_birth_credentials, check_birth_subject

        check_birth_credentials(birth, self.config.path)
        check_birth_subject(birth, self.device_id, self.config.path)
        return await self._simpleenroll(
            lambda csr: self.est.simpleenroll_idevid(csr, birth.cert, birth.key)
        )

    async def _simpleenroll(
        self,
        send: Callable[[x509.CertificateSigningRequest], Awaitable[list[x509.Certificate]]],
    ) -> Identity:
        """The bootstrap exchange with a fresh key (CN = device id): retries 202, 5xx and
        network errors with backoff; 401/403 propagate (refused: retrying would only hammer)."""
        from device_agent.est_wire import WireError, build_csr

        key = await self._new_key()
        csr = build_csr(key, self.device_id)
        attempt = suspended = 0
        while True:
            self._set_state(AgentState.ENROLLING)
            try:
                cas = await self._cacerts()
                certs = await send(csr)
                chain = self._accept(key, certs, cas)
                break
            except WireError as exc:  # from check_cacerts
                delay, why = self.est_backoff.delay(attempt, self.rng), f"/cacerts: {exc.why}"
            except EstRetryLater as exc:
                delay, why = exc.retry_after, "enrollment pending (202)"
            except (EstUnavailable, EstProtocolError, CertificateRejected) as exc:
                delay, why = self.est_backoff.delay(attempt, self.rng), str(exc)
            except DeviceSuspended as exc:
                if not self._wait_if_suspended:
                    raise
                delay = self._suspended(exc, suspended)
                suspended += 1
                await self._sleep(delay)
                continue
            attempt += 1
            self.last_error = why
            log.warning("%s: enrollment: %s; retrying in %.1f s", self.device_id, why, delay)
            self._emit(AgentEvent.retry("enroll", why, delay))
            await self._sleep(delay)
        ident = self._store(key, chain)
        self.last_error = None
        self._emit(AgentEvent.enrolled(ident.serial_hex))
        log.info(
            "%s: enrolled: certificate serial %s valid until %s; renewal at %s",
            self.device_id,
            ident.serial_hex,
            ident.not_after.isoformat(),
            ident.next_renewal.isoformat(),
        )
        return ident

    # -- renewal -------------------------------------------------------------------------------
    async def _renew_once(self, ident: Identity) -> Identity:
        from device_agent.est_wire import WireError, build_csr

        key = await self._new_key()  # rotation: every renewal brings a fresh key
        csr = build_csr(key, self.device_id)
        try:
            cas = await self._cacerts()
        except WireError as exc:
            raise CertificateRejected(f"/cacerts: {exc.why}") from exc
        certs = await self.est.simplereenroll(csr, ident.cert_path, ident.key_path)
        chain = self._accept(key, certs, cas)
        # The swap: after this line the new key and certificate are current on disk and the
        # old key is gone. A crash before it leaves the old identity, which still works.
        new = self._store(key, chain)
        self.identity = new
        return new

    async def _renewal_loop(self) -> NoReturn:
        while True:
            assert self.identity is not None
            await self._sleep_until(self.identity.next_renewal)
            await self._renew_with_retries()

    async def _renew_with_retries(self) -> None:
        attempt = 0
        while True:
            ident = self.identity
            assert ident is not None
            now = self.now()
            if is_expired(ident.not_after, now):
                # Renewal failed for the whole remaining third of the lifetime. The server
                # will not renew an expired certificate (RFC 7030 3.3.2 mTLS fails), so only a
                # new bootstrap helps: the birth certificate, or a new token; don't loop.
                self.identity = await self._bootstrap(
                    f"the certificate expired at {ident.not_after.isoformat()} before it "
                    "could be renewed",
                )
                self._rotated(ident)
                return
            self._set_state(AgentState.RENEWING)
            budget = attempt_timeout(self.config.http_timeout, ident.not_after, now)
            try:
                async with asyncio.timeout(budget):
                    new = await self._renew_once(ident)
            except TimeoutError:  # ours: the EST client reports its own as EstUnavailable
                delay, why = (
                    self.est_backoff.delay(attempt, self.rng),
                    f"no answer in {budget:.1f} s",
                )
            except DeviceRevoked:
                raise
            except DeviceSuspended as exc:
                delay = retry_deadline_delay(
                    self._suspended(exc, attempt), ident.not_after, self.now()
                )
                attempt += 1
                await self._sleep(delay)
                continue
            except EstRejected as exc:
                if exc.status in (401, 403):
                    if is_expired(ident.not_after, self.now()):
                        continue  # it expired while the attempt was under way: re-bootstrap
                    raise  # refused: retrying blindly would only hammer the service
                delay, why = self.est_backoff.cap, str(exc)  # other 4xx: slowly
            except EstRetryLater as exc:
                delay, why = exc.retry_after, "renewal pending (202)"
            except (
                EstUnavailable,
                EstProtocolError,
                TlsVerificationFailed,
                CertificateRejected,
            ) as exc:
                delay, why = self.est_backoff.delay(attempt, self.rng), str(exc)
            else:
                self.renewals += 1
                self.last_error = None
                log.info(
                    "%s: renewed with a new key: serial %s -> %s, valid until %s; next "
                    "renewal at %s",
                    self.device_id,
                    ident.serial_hex,
                    new.serial_hex,
                    new.not_after.isoformat(),
                    new.next_renewal.isoformat(),
                )
                self._emit(AgentEvent.renewed(ident.serial_hex, new.serial_hex))
                self._set_state(self._session_state())
                self._rotated(ident)
                return
            attempt += 1
            self.last_error = why
            delay = retry_deadline_delay(delay, ident.not_after, self.now())
            log.warning(
                "%s: renewal failed: %s; retrying in %.1f s (certificate valid until %s)",
                self.device_id,
                why,
                delay,
                ident.not_after.isoformat(),
            )
            self._emit(AgentEvent.retry("renew", why, delay))
            self._set_state(self._session_state())
            await self._sleep(delay)

    def _session_state(self) -> AgentState:
        """What the session is doing, for after a renewal or a wait."""
        if self.link is not None and self.link.connected.is_set():
            return AgentState.CONNECTED
        return AgentState.CONNECTING

    # -- suspension ----------------------------------------------------------------------------
    def _suspended(self, exc: DeviceSuspended, attempt: int) -> float:
        """Record that the service says the device is suspended; the wait before asking again."""
        delay = self.suspended_backoff.delay(attempt, self.rng)
        why = f"device suspended: {exc.reason}"
        if self.state is not AgentState.SUSPENDED or self.last_error != why:
            log.warning(
                "%s: %s; waiting for the operator to resume it (asking again in %.1f s, then at "
                "most every %.1f s)",
                self.device_id,
                why,
                delay,
                self.suspended_backoff.cap,
            )
        self.last_error = why
        self._emit(AgentEvent.retry("suspended", why, delay))
        self._set_state(AgentState.SUSPENDED)
        self._write_status()
        return delay

    async def _on_broker_refused(self, refusal: BrokerRefused) -> bool:
        """The broker refused us, and MQTT 3.1.1 cannot say why: ask the service.

        Revoked: DeviceRevoked (final). Suspended: wait, asking again with the long backoff,
        and return True once resumed (reconnect now). Active: return False (the broker's view
        may lag the registry's; the link backs off as usual). Any other refusal: the broker's
        BrokerRefused (final). The service unreachable: cannot tell, so wait as for a
        suspension and ask again; a refused device must not hammer either.
        """
        assert self.identity is not None
        attempt = 0
        while True:
            try:
                await self.est.device_status(self.identity.cert_path, self.identity.key_path)
            except DeviceSuspended as exc:
                delay = self._suspended(exc, attempt)
            except DeviceRevoked:
                raise
            except EstRejected as exc:
                raise refusal from exc
            except (EstUnavailable, EstProtocolError, TlsVerificationFailed) as exc:
                delay = self.suspended_backoff.delay(attempt, self.rng)
                why = f"{refusal}; the enrollment server cannot say why: {exc}"
                self.last_error = why
                log.warning("%s: %s; asking again in %.0f s", self.device_id, why, delay)
                self._emit(AgentEvent.retry("mqtt", why, delay))
            else:
                if attempt == 0:
                    return False
                log.info("%s: the device was resumed; reconnecting", self.device_id)
                self.last_error = None
                self._set_state(AgentState.CONNECTING)
                return True
            attempt += 1
            await self._sleep(delay)

    def _rotated(self, old: Identity) -> None:
        self._write_status()
        if self.link is not None:
            self.link.rotate()

    # -- session -------------------------------------------------------------------------------
    def _credentials(self) -> tuple[Any, Any]:
        assert self.identity is not None
        return self.identity.cert_path, self.identity.key_path

    def _on_connection(self, up: bool, why: str | None) -> None:
        if up:
            self.last_connected = self.now()
            self.last_error = None
            self._emit(AgentEvent.connected())
            self._set_state(AgentState.CONNECTED)
            self._write_status()
            return
        self._emit(AgentEvent.disconnected(why or "unknown"))
        if self.state is AgentState.CONNECTED:
            self._set_state(AgentState.CONNECTING)

    def _on_mqtt_retry(self, why: str, delay: float) -> None:
        self._emit(AgentEvent.retry("mqtt", why, delay))

    def telemetry(self) -> bytes:
        """The telemetry message for this instant (agent fields + the application hook)."""
        assert self.identity is not None
        extra = None
        if self.telemetry_hook is not None:
            try:
                extra = self.telemetry_hook()
            except Exception:
                log.exception("%s: telemetry hook failed; sending without its data", self.device_id)
        return telemetry_payload(
            now=self.now(),
            uptime=time.monotonic() - self._started,
            cert_not_after=self.identity.not_after,
            agent_version=__version__,
            extra=extra,
        )

    async def _telemetry_loop(self, link: MqttLink) -> NoReturn:
        while True:
            link.enqueue(self.telemetry())
            await self._sleep(self.config.telemetry_interval)

    async def _run(self) -> ExitCode:
        await self._ensure_identity()
        cfg = self.config
        self.link = link = MqttLink(
            self.device_id,
            *cfg.mqtt_brokers[0],
            cfg.trust_anchor,
            self._credentials,
            queue_size=cfg.queue_size,
            keepalive=cfg.mqtt_keepalive,
            backoff=self.mqtt_backoff,
            rng=self.rng,
            on_command=self.on_command,
            on_connection=self._on_connection,
            on_retry=self._on_mqtt_retry,
            on_refused=self._on_broker_refused,
            on_delivered=self.on_delivered,
            brokers=cfg.mqtt_brokers,
        )
        self._set_state(AgentState.CONNECTING)
        assert self._stop is not None
        tasks = {
            asyncio.create_task(link.run(), name="mqtt"),
            asyncio.create_task(self._telemetry_loop(link), name="telemetry"),
            asyncio.create_task(self._renewal_loop(), name="renewal"),
            asyncio.create_task(self._stop.wait(), name="stop"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all(tasks)
        # Retrieve every outcome (tasks that ended while being cancelled included), then
        # report what ended the session: a refusal, a revocation, an expiry, or a stop.
        outcomes = {t: t.exception() for t in tasks if t.done() and not t.cancelled()}
        for task in done:
            exc = outcomes.get(task)
            if exc is not None:
                raise exc
        raise _StopRequested
