"""Running the service: open the home and registry, start HTTPS (EST, admin) and HTTP sites."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from enroll_server.broker.server import BrokerConfig, RunningBroker, start_broker
from enroll_server.enrollment.manufacturers import REFRESH_INTERVAL, TrustedManufacturers
from enroll_server.enrollment.operators import bootstrap_admin
from enroll_server.enrollment.service import EnrollmentService, ProfileChooser
from enroll_server.enrollment.token_index import TokenIndex
from enroll_server.home.config import ServerConfig, load_config
from enroll_server.home.issuers import crl_route, previous_issuers
from enroll_server.home.layout import (
    LoadedHome,
    load_home,
    registry_location,
    renew_server_certificate,
)
from enroll_server.home.root import root_crl as home_root_crl
from enroll_server.home.root_update import RootFiles
from enroll_server.home.server_certificate import CHECK_INTERVAL, ServerCertificates
from enroll_server.pki.ca import Issuer
from enroll_server.pki.ca_expiry import (
    expiry_metrics,
    expiry_warning,
    root_crl_metrics,
    root_crl_warning,
)
from enroll_server.pki.key_id import key_id
from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import Registry
from enroll_server.registry.checkpointer import LOOP_AUTOCHECKPOINT_PAGES, Checkpointer
from enroll_server.revocation.issuers import IssuerRevocation
from enroll_server.revocation.routes import RootCrl, revocation_routes
from enroll_server.revocation.state import RevocationState
from enroll_server.transport.connection_limits import ConnectionLimits
from enroll_server.transport.listen import listening, serves_only_this_machine
from enroll_server.transport.loop import until_stop_signal
from enroll_server.web.app import (
    RunningSite,
    admin_ssl_context,
    build_admin_app,
    build_http_app,
    build_https_app,
    server_ssl_context,
    start_est_site,
    start_site,
)
from enroll_server.web.provisioner import Provisioner
from enroll_server.web.state import AppState
from enroll_server.wiring.issuers import IssuerWatch, catch_up_at_start

if TYPE_CHECKING:
    from enroll_server.registry.notify import EventListener
from fleetpki.clock import utc_now

log = logging.getLogger("fleetpki.server")
# How often serve looks at H/ca/root.crl again: a ceremony may replace it while serve runs.
ROOT_CRL_RECHECK = timedelta(seconds=5)


@dataclass
class ServerHandle:
    """The running service. `stop_est()` / `start_est()` take the EST listener
    down and up again on the same address (an outage, as the simulator stages one) while
    CRL/OCSP, the registry and the broker stay up."""

    home: LoadedHome
    state: AppState
    registry: Registry
    https: RunningSite
    http: RunningSite
    revocation: RevocationState
    broker: RunningBroker | None = None
    stoppers: list[Callable[[], Any]] = field(default_factory=list)
    # Where the HTTPS site listens and with which TLS context, to start it again there.
    bind: str = "127.0.0.1"
    https_tls: ssl.SSLContext | None = None
    est_up: bool = True
    # The CRL publisher's own connection (see start_server); closed after the HTTP site.
    crl_registry: Registry | None = None
    # WAL checkpoints, off the event loop (registry.checkpointer).
    checkpointer: Checkpointer | None = None
    # PostgreSQL: the group commits' own connection (start_server); closed after the sites.
    commit_writer: Registry | None = None
    # Keeps the listeners' TLS server certificate current (server_certificate).
    server_certificates: ServerCertificates | None = None
    # On a shared (PostgreSQL) registry: the LISTEN thread that wakes revocation here.
    event_listener: EventListener | None = None
    # The admin API and /metrics (build_admin_app); set by start_server.
    admin: RunningSite | None = None
    # Every live issuing CA's CRL and OCSP (`revocation` is the current one's at start).
    issuers: IssuerRevocation | None = None

    @property
    def est_port(self) -> int:
        return self.https.port

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def admin_port(self) -> int:
        assert self.admin is not None
        return self.admin.port

    @property
    def mqtt_port(self) -> int | None:
        return self.broker.port if self.broker is not None else None

    async def stop_est(self) -> None:
        """Close the EST listener and its open connections (idempotent)."""
        if self.est_up:
            self.est_up = False
            await self.https.stop()

    async def start_est(self) -> None:
        """Listen for EST again on the host and port it had (idempotent)."""
        if self.est_up:
            return
        assert self.https_tls is not None
        limits = self.https.guard.limits if self.https.guard is not None else None
        self.https = await start_est_site(
            build_https_app(self.state), self.bind, self.https.port, self.https_tls, limits
        )
        self.est_up = True

    async def stop(self) -> None:
        for stop in reversed(self.stoppers):
            result = stop()
            if asyncio.iscoroutine(result):
                await result
        await self.stop_est()
        await self.http.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.crl_registry is not None:
            self.crl_registry.close()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.commit_writer is not None:
            self.commit_writer.close()
        self.registry.close()


def renew_and_record(
    loaded: LoadedHome, now: datetime, *, actor: str, config: ServerConfig | None = None
) -> x509.Certificate:
    """Renew the TLS server certificate (home.renew_server_certificate) and audit it, on a
    registry connection of its own (it runs in a worker thread or the CLI).

    `config`: whose host names to certify; by default the home's config file as it is now,
    not as the server read it at start (`server-cert renew --hostname` may have added one).
    """
    if config is None:
        config = load_config(loaded.layout.config)
    cert = renew_server_certificate(loaded.layout, loaded.issuer, config, now)
    with Registry.open(loaded.registry) as registry:
        registry.append_audit(
            actor=actor,
            action="tls.renew",
            device_id=None,
            detail={
                "serial": f"{cert.serial_number:x}",
                "not_after": cert.not_valid_after_utc.isoformat(),
                "hostnames": list(config.hostnames),
            },
            now=now,
        )
    return cert


async def start_server(
    home: Path,
    *,
    est_port: int | None = None,
    http_port: int | None = None,
    mqtt_port: int | None = None,
    admin_port: int | None = None,
    broker: bool = False,
    bind: str | None = None,
    admin_bind: str | None = None,
    max_packet_size: int | None = None,
    profile: DeviceProfile | None = None,
    profile_for: ProfileChooser | None = None,
    clock: Callable[[], datetime] = utc_now,
    server_cert_check_interval: float = CHECK_INTERVAL,
    registry_at: str | None = None,
    provisioner: Provisioner | None = None,
) -> ServerHandle:
    """Start EST (HTTPS), CRL + OCSP (HTTP), the admin API + /metrics (HTTPS, on `admin_bind`,
    loopback by default) and, if `broker`, the mTLS broker.

    Port arguments override the config; 0 binds an ephemeral port (read it from the handle).
    `profile` replaces the config's device certificate profile; `profile_for(device_id)`, if
    given, chooses one per device at each issuance (see EnrollmentService).
    `server_cert_check_interval`: seconds between looks at the TLS server certificate's files
    and lifetime (server_certificate.ServerCertificates).
    `max_packet_size` overrides the config's broker.max_packet_size.
    `registry_at`: the registry (`--registry`: a PostgreSQL URL or an SQLite file) instead of
    the home's (home.registry_location).
    `provisioner`: batch creation and new device tokens for the admin API
    (`provisioning.admin.Provisioning`; without it those routes answer 409).
    """
    loaded = load_home(home)
    if registry_at is not None:
        loaded = replace(
            loaded, registry=registry_location(loaded.layout, loaded.config, flag=registry_at)
        )
    # The event loop's connection leaves WAL checkpoints to a thread (registry.checkpointer):
    # a checkpoint in a commit on the loop held every connection for 45-140 ms at fleet size.
    # PostgreSQL checkpoints by itself, off this process.
    registry = Registry.open(loaded.registry, wal_autocheckpoint=LOOP_AUTOCHECKPOINT_PAGES)
    # A node that was down while another changed the CA starts with that change.
    loaded = await asyncio.to_thread(catch_up_at_start, loaded, registry, clock())
    cfg = loaded.config
    checkpointer = Checkpointer(registry.path) if not registry.shared else None
    https: RunningSite | None = None
    http: RunningSite | None = None
    admin: RunningSite | None = None
    crl_registry: Registry | None = None
    commit_writer: Registry | None = None
    try:
        if checkpointer is not None:
            checkpointer.start()
        bootstrap_admin(registry, loaded.layout.admin_token, clock(), actor="serve")
        profile = profile or DeviceProfile(validity=cfg.device_validity, backdate=cfg.backdate)
        host = bind or cfg.bind
        # The EST listener trusts the manufacturer CAs for birth certificates (IDevID) besides
        # the fleet chain: TrustedManufacturers loads them into it, and the service checks each
        # birth certificate against them as the files are at that moment.
        tls = server_ssl_context(
            loaded.layout.server_cert, loaded.layout.server_key, loaded.layout.chain
        )
        manufacturers = TrustedManufacturers(loaded.layout.root, [tls])
        manufacturers.current()
        service = EnrollmentService(
            registry, loaded.issuer, profile, profile_for, manufacturers=manufacturers.current
        )
        # First enrollments check their token in memory, not with a registry read.
        service.tokens = TokenIndex(registry)
        # The issuing CAs a rollover left live beside the current one (home.issuers).
        previous = previous_issuers(loaded.layout, cfg, loaded.issuer.cert)
        service.previous_issuers = tuple(i.cert for i in previous)
        state = AppState(
            service=service,
            registry=registry,
            ca_chain=(
                loaded.issuer.cert,
                *service.previous_issuers,
                *loaded.intermediates,
                loaded.root_cert,
            ),
            clock=clock,
            home=loaded,
            provisioner=provisioner,
            roots=RootFiles(loaded.layout),
        )
        # The group commits run in a worker thread on a connection of their own, so the loop
        # serves on while the registry syncs its commit (commit_queue). Like the loop's, this
        # connection leaves SQLite's WAL checkpoints to the checkpointer thread.
        commit_writer = Registry.open(loaded.registry, wal_autocheckpoint=LOOP_AUTOCHECKPOINT_PAGES)
        state.commits.writer = commit_writer
        # The CRL publisher works in a worker thread (a big CRL takes a second to sign) and
        # bumps the CRL number, a write that may wait for a lock another process holds: on a
        # connection of its own, so that wait never holds the loop's registry reads.
        crl_registry = Registry.open(loaded.registry)

        def issuer_state(
            issuer: Issuer, kid: str, source: Registry = crl_registry
        ) -> RevocationState:
            return RevocationState.from_registry(
                source, issuer, next_update=cfg.crl_next_update, clock=clock, issuer_key_id=kid
            )

        current_id = key_id(loaded.issuer.cert)
        revocation = issuer_state(loaded.issuer, current_id)
        revocations = IssuerRevocation(
            current_id, revocation, crl_route(loaded.layout, loaded.issuer.cert)
        )
        for issuer in previous:
            revocations.add(
                key_id(issuer.cert),
                issuer_state(issuer, key_id(issuer.cert)),
                crl_route(loaded.layout, issuer.cert),
            )
        state.on_change.append(revocations.changed)
        state.current_crl = revocations.crl
        tokens = service.tokens
        state.on_revocation.append(lambda device, why: tokens.discard(device))
        state.metrics.extra.append(tokens.metrics_text)
        limits = ConnectionLimits.from_config(cfg)
        port = _port(est_port, cfg.est_port)
        with listening("EST (HTTPS)", host, port, "--est-port"):
            https = await start_est_site(build_https_app(state), host, port, tls, limits)
        # The root CRL: none of ours under an external root (the operator's PKI publishes
        # its own, at the CDP its CA put in our issuing certificate); an offline root's file
        # as the last ceremony signed it (looked at every 5 s); else re-signed here.
        root_crl = RootCrl(partial(home_root_crl, loaded.layout), clock, ROOT_CRL_RECHECK)
        # Signed now if missing or due when the root key is here: a broken key fails start-up.
        root_routes = [] if cfg.root == "external" else root_crl.routes()
        if cfg.root != "external":
            await root_crl.der()
        http_app = build_http_app(state, revocation_routes(revocations) + root_routes)
        revocations.attach(http_app)
        port = _port(http_port, cfg.http_port)
        with listening("CRL/OCSP (HTTP)", host, port, "--http-port"):
            http = await start_site(http_app, host, port, limits=limits)
        admin_host, port = admin_bind or cfg.admin_bind, _port(admin_port, cfg.admin_port)
        admin_tls = admin_ssl_context(loaded.layout.server_cert, loaded.layout.server_key)
        with listening("the admin API (HTTPS)", admin_host, port, "--admin-port"):
            admin = await start_site(build_admin_app(state), admin_host, port, admin_tls, limits)
        handle = ServerHandle(
            loaded, state, registry, https, http, revocation, bind=host, https_tls=tls
        )
        handle.admin = admin
        handle.crl_registry = crl_registry
        handle.commit_writer = commit_writer
        handle.checkpointer = checkpointer
        tokens.start()
        handle.stoppers.append(tokens.stop)
        refresh = asyncio.get_running_loop().create_task(
            _refresh_manufacturers(manufacturers), name="fleetpki-manufacturers"
        )
        handle.stoppers.append(refresh.cancel)
    except BaseException:
        for site in (admin, http, https):
            if site is not None:
                await site.stop()
        if crl_registry is not None:
            crl_registry.close()
        if commit_writer is not None:
            commit_writer.close()
        if checkpointer is not None:
            checkpointer.stop()
        registry.close()
        raise
    if broker:
        port = _port(mqtt_port, cfg.mqtt_port)
        try:
            with listening("the MQTT broker (mTLS)", host, port, "--mqtt-port"):
                handle.broker = await start_broker(
                    BrokerConfig(
                        server_cert=loaded.layout.server_cert,
                        server_key=loaded.layout.server_key,
                        ca_file=loaded.layout.chain,
                        registry_path=loaded.registry,
                        host=host,
                        port=port,
                        max_packet_size=(
                            cfg.max_packet_size if max_packet_size is None else max_packet_size
                        ),
                        # The TLS handshake and CONNECT: the request-head deadline of MQTT.
                        connect_timeout=limits.head_timeout,
                        handshake_timeout=limits.head_timeout,
                    ),
                    clock=clock,
                )
        except BaseException:
            await handle.stop()
            raise
        running = handle.broker
        # In-process revocations drop the session at once; other processes' revocations reach
        # the broker through its registry event poll (every 200 ms).
        state.on_revocation.append(lambda device, why: running.disconnect(device, reason=why))
        state.live_sessions = running.sessions
        state.metrics.extra.append(running.metrics_text)
        handle.stoppers.append(running.stop)
    if registry.shared:
        # Other nodes' revocations: PostgreSQL notifies at their commit (registry/notify.py),
        # so this node's broker, CRL and OCSP learn of them at once, not at the next poll.
        from enroll_server.registry.location import PostgresLocation
        from enroll_server.registry.notify import EventListener  # psycopg: only when used

        loop = asyncio.get_running_loop()
        wake: list[Callable[[], object]] = [revocations.changed]
        if handle.broker is not None:
            wake.append(handle.broker.poll_revocations)
        location = cast(PostgresLocation, loaded.registry)
        listener = EventListener(location, [partial(loop.call_soon_threadsafe, w) for w in wake])
        listener.start()
        handle.event_listener = listener
        handle.stoppers.append(partial(asyncio.to_thread, listener.stop))
    # The TLS server certificate of both listeners: reloaded when its files change, renewed
    # by this process (it holds the issuing CA) at 2/3 of its lifetime.
    try:
        certificates = ServerCertificates(
            loaded.layout.server_cert,
            loaded.layout.server_key,
            [tls, admin_tls] + ([handle.broker.tls_context] if handle.broker is not None else []),
            clock,
            # By the current issuing CA (it changes at a rollover).
            renew=lambda now: renew_and_record(
                replace(loaded, issuer=service.issuer), now, actor="server"
            ),
            interval=server_cert_check_interval,
        )
    except BaseException:
        await handle.stop()
        raise
    certificates.start()
    handle.server_certificates = certificates
    handle.stoppers.append(certificates.stop)
    # `fleetpki ca rollover` / `ca revoke-issuing` picked up live; old issuers retired.
    watch = IssuerWatch(
        loaded,
        service,
        state,
        revocations,
        issuer_state,
        [tls] + ([handle.broker.tls_context] if handle.broker is not None else []),
        clock,
        server_cert_check_interval,
        on_change=root_crl.reload,
        on_adopt=certificates.reload_if_changed,
    )
    watch.start()
    if handle.event_listener is not None:  # another node's CA change, at its commit
        from enroll_server.registry.notify import CA_STATE_PAYLOAD

        loop = asyncio.get_running_loop()
        handle.event_listener.on(CA_STATE_PAYLOAD, partial(loop.call_soon_threadsafe, watch.wake))
        state.metrics.extra.append(watch.metrics_text)
    handle.issuers = revocations
    handle.stoppers.append(watch.stop)
    state.metrics.extra.append(certificates.metrics_text)
    log.info(
        "EST on https://%s:%d, CRL/OCSP on http://%s:%d, admin API on https://%s:%d",
        host,
        https.port,
        host,
        http.port,
        admin_host,
        admin.port,
    )
    if (warning := serves_only_this_machine(host, cfg.public_host)) is not None:
        log.warning("%s", warning)
    issuing = loaded.issuer.cert
    if (warning := expiry_warning(issuing, clock(), cfg.ca_expiry_warning)) is not None:
        log.warning("%s", warning)
    # The current issuing CA's, which a rollover replaces while serve runs.
    state.metrics.extra.append(
        lambda: expiry_metrics(service.issuer.cert, clock(), cfg.ca_expiry_warning)
    )
    # An offline root (no root key here, none in a token): its CRL is the last ceremony's.
    if cfg.root != "external" and not cfg.root_key and not loaded.layout.root_key.exists():
        if (warning := root_crl_warning(root_crl.crl, clock(), cfg.root_crl_warning)) is not None:
            log.warning("%s", warning)
        state.metrics.extra.append(
            lambda: root_crl_metrics(root_crl.crl, clock(), cfg.root_crl_warning)
        )
    return handle


async def _refresh_manufacturers(manufacturers: TrustedManufacturers) -> None:
    """Look at H/manufacturers every few seconds, so that a CA added while the server runs is
    trusted by the EST handshake (a removed one is refused by the service's check at once)."""
    while True:
        await asyncio.sleep(REFRESH_INTERVAL)
        try:
            manufacturers.current()
        except (OSError, ssl.SSLError) as exc:
            log.warning("reading the manufacturer CAs failed: %s", exc)


def _port(override: int | None, configured: int) -> int:
    return configured if override is None else override


async def serve_forever(handle: ServerHandle) -> None:
    """Block until SIGINT/SIGTERM, then stop cleanly."""
    try:
        await until_stop_signal()
    finally:
        await handle.stop()
