"""The aiohttp apps: HTTPS (EST, admin API, metrics) and plain HTTP (CRL, OCSP, CA certs)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from enroll_server.broker.rabbitmq_auth_routes import rabbitmq_auth_routes
from enroll_server.enrollment.commit_queue import registry_busy
from enroll_server.errors import ServiceError, error_headers, http_status
from enroll_server.est.front import MAX_FIELDS, MAX_LINE, EstFront
from enroll_server.est.routes import EST_PREFIX, est_routes
from enroll_server.home.issuers import first_issuer_id
from enroll_server.pki.key_id import key_id
from enroll_server.registry import RegistryBusy
from enroll_server.transport.connection_limits import (
    CONNECTION_GUARD,
    ConnectionLimits,
    Guard,
    Watched,
    deadline_middleware,
)
from enroll_server.transport.tls_policy import apply_tls_policy
from enroll_server.web.admin_api import admin_routes, require_operator
from enroll_server.web.device_status import device_status_routes
from enroll_server.web.request_log import RequestLog
from enroll_server.web.state import APP_STATE, AppState
from enroll_server.webconsole import CONSOLE_PREFIX, build_console_app

log = logging.getLogger("fleetpki.http")

# A base64 CSR of the largest accepted size (16 KiB DER) is about 22 KiB; refuse much more
# before reading it (HTTP 413).
MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = request.app[APP_STATE]
    is_est = request.path.startswith(EST_PREFIX + "/simple")
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ServiceError as exc:
        status = http_status(exc)
        if is_est:
            st.metrics.enrollments.inc(f"rejected_{status}")
        # Reasons name what was wrong but never carry a secret (tokens are not echoed).
        log.info("%s %s -> %d %s", request.method, request.path, status, exc.reason)
        return web.Response(status=status, text=exc.reason + "\n", headers=error_headers(exc))
    except RegistryBusy as exc:
        # The registry locked past the deadline or unreachable (PostgreSQL restarting): 503
        # with Retry-After; each write is one transaction, so nothing was half-written.
        log.warning("%s %s -> 503 %s", request.method, request.path, exc)
        unavailable = registry_busy(exc)
        if is_est:
            st.metrics.enrollments.inc("rejected_503")
        return web.Response(
            status=503, text=unavailable.reason + "\n", headers=error_headers(unavailable)
        )
    except web.HTTPException as exc:
        if is_est and exc.status >= 400:
            st.metrics.enrollments.inc(f"rejected_{exc.status}")
        raise
    if is_est:
        st.metrics.latency.observe(time.perf_counter() - started)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[APP_STATE].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def issuing_ca_der(request: web.Request) -> web.Response:
    """caIssuers target (RFC 5280 4.2.2.1): an issuing CA certificate, DER. /issuing-ca.der:
    the first issuer (what certificates from before any rollover name) while it lives, else
    the current one; /issuing-ca/<id>.der: that live issuer (home.issuers)."""
    st = request.app[APP_STATE]
    issuers = [c for c in st.ca_chain if c.subject != c.issuer]
    wanted = request.match_info.get("issuer")
    if wanted is None and st.home is not None:
        wanted = first_issuer_id(st.home.layout)
    found = next((c for c in issuers if key_id(c) == wanted), None)
    if found is None and "issuer" in request.match_info:
        raise web.HTTPNotFound(text=f"no live issuing CA {wanted}\n")
    cert = found or st.ca_chain[0]
    return web.Response(
        body=cert.public_bytes(serialization.Encoding.DER), content_type="application/pkix-cert"
    )


def build_https_app(state: AppState) -> web.Application:
    """The device-facing HTTPS app: EST and device status. No admin API, no metrics: those
    are on the admin listener (build_admin_app), which binds to loopback by default."""
    app = web.Application(
        middlewares=[deadline_middleware, error_middleware], client_max_size=MAX_BODY
    )
    app[APP_STATE] = state
    app.add_routes(
        [
            *est_routes(),
            *device_status_routes(),
            web.get("/healthz", healthz),
        ]
    )
    return app


def build_admin_app(state: AppState) -> web.Application:
    """The operators' HTTPS app: the admin API and /metrics, both behind an operator token,
    the web console under /console/ (behind a login with one), and RabbitMQ's HTTP auth
    backend under /rabbitmq/<secret>/ (broker.rabbitmq_auth_routes: RabbitMQ sends no token)."""
    app = web.Application(
        middlewares=[deadline_middleware, error_middleware], client_max_size=MAX_BODY
    )
    app[APP_STATE] = state
    app.add_routes(
        [
            *admin_routes(),
            *rabbitmq_auth_routes(),
            web.get("/healthz", healthz),
            web.get("/metrics", require_operator(metrics)),
            web.get("/", to_console),
            web.get(CONSOLE_PREFIX, to_console),
        ]
    )
    app.add_subapp(CONSOLE_PREFIX, build_console_app(state))
    return app


async def to_console(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/console/")


def build_http_app(state: AppState, extra: list[web.RouteDef] | None = None) -> web.Application:
    app = web.Application(
        middlewares=[deadline_middleware, error_middleware], client_max_size=MAX_BODY
    )
    app[APP_STATE] = state
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/issuing-ca.der", issuing_ca_der),
            web.get("/issuing-ca/{issuer}.der", issuing_ca_der),
            *(extra or []),
        ]
    )
    return app


def server_ssl_context(cert_chain: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS >= 1.2, AEAD suites only; client certificates optional (first enrollment has none),
    verified if sent, against `client_ca` (the fleet chain). The server adds the manufacturer
    CAs, whose birth certificates (IDevID) may authenticate simpleenroll, through
    manufacturers.TrustedManufacturers; only the EST listener trusts them, the broker never.
    """
    ctx = admin_ssl_context(cert_chain, key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


def admin_ssl_context(cert_chain: Path, key: Path) -> ssl.SSLContext:
    """TLS >= 1.2 and AEAD suites only, the server certificate, no client certificates (the
    admin listener authenticates the bearer token); the EST context starts from it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    apply_tls_policy(ctx)  # TLS >= 1.2, AEAD suites only: the broker's policy too
    # A client that ends its input with a bare FIN after its request (no close_notify) still
    # gets the reply: OpenSSL 3 would otherwise fail the connection (and send decode_error).
    # No truncation risk: every HTTP message here is delimited by its own framing.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.load_cert_chain(cert_chain, key)
    # No TLS 1.3 session tickets (RFC 8446 4.6.1): a device connects to enroll and then again
    # only to renew weeks later, long after any ticket lifetime, so tickets are never used;
    # minting two per connection costs the server CPU and the device bytes on every enrollment.
    ctx.num_tickets = 0
    return ctx


@dataclass
class RunningSite:
    runner: web.AppRunner
    port: int
    front: EstFront | None = None
    guard: Guard | None = None
    server: asyncio.Server | None = None

    @property
    def addresses(self) -> list[Any]:
        """The socket addresses listened on (a plain aiohttp site's)."""
        return [sock.getsockname() for sock in self.server.sockets] if self.server else []

    async def stop(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        if self.server is not None:
            self.server.close()
        if self.front is not None:
            await self.front.stop()
        await self.runner.cleanup()


def _runner(app: web.Application, limits: ConnectionLimits) -> web.AppRunner:
    """The aiohttp runner of every listener; its request handlers log through RequestLog
    (a malformed request: one line, never its bytes)."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # Off: connections are short and the guard closes idle ones (connection_limits);
        # it saves a setsockopt per connection.
        tcp_keepalive=False,
        # aiohttp's own idle close (its default is an hour), should the guard not know a
        # connection; the guard applies the same limit.
        keepalive_timeout=limits.idle_timeout,
        logger=RequestLog(log),
        # The head limits the EST front end hands over at (est/front.py), aiohttp's defaults.
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
        max_headers=MAX_FIELDS,
    )


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    limits: ConnectionLimits | None = None,
) -> RunningSite:
    """A plain aiohttp listener (CRL/OCSP over HTTP, the admin API over HTTPS), its
    connections held to `limits` (connection_limits)."""
    limits = limits or ConnectionLimits()
    guard = Guard(limits)
    app[CONNECTION_GUARD] = guard
    runner = _runner(app, limits)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: Watched(guard, handlers(), half_close=ssl_context is None),
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=limits.head_timeout if ssl_context is not None else None,
            backlog=1024,
        )
    except BaseException:
        await runner.cleanup()
        raise
    guard.start()
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    return RunningSite(runner, bound, guard=guard, server=server)


async def start_est_site(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    limits: ConnectionLimits | None = None,
) -> RunningSite:
    """The HTTPS listener: the lean EST front end, handing everything else to `app`."""
    guard = Guard(limits or ConnectionLimits())
    app[CONNECTION_GUARD] = guard
    runner = _runner(app, guard.limits)
    await runner.setup()
    assert runner.server is not None
    front = EstFront(app[APP_STATE], runner.server, MAX_BODY, guard)
    try:
        bound = await front.start(host, port, ssl_context)
    except BaseException:
        await runner.cleanup()
        raise
    return RunningSite(runner, bound, front, guard)
