"""`fleetpki broker`: run the mTLS broker alone against a home folder's CA files and registry."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from aiohttp import web
from rich.console import Console

from enroll_server.broker.errors import BrokerError
from enroll_server.broker.policy import KeepalivePolicy
from enroll_server.broker.server import BrokerConfig, start_broker
from enroll_server.cli.exit_codes import fail
from enroll_server.cli.options import HomeOpt, serve_port
from enroll_server.enrollment.operators import operator_for
from enroll_server.errors import ServiceError, error_headers, http_status
from enroll_server.home.server_certificate import CHECK_INTERVAL, ServerCertificates
from enroll_server.registry import Registry
from enroll_server.transport.listen import ListenFailed, listening
from enroll_server.web.app import admin_ssl_context

log = logging.getLogger("fleetpki.broker")

app = typer.Typer(
    help="The embedded mTLS MQTT broker (run alone: `fleetpki broker --home H`).",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)

HostOpt = Annotated[
    str | None, typer.Option("--bind", help="Address to listen on (default: server.bind).")
]
PortOpt = Annotated[int | None, serve_port("MQTT over TLS port (default: server.mqtt_port).")]
MetricsOpt = Annotated[
    int | None,
    serve_port(
        "Serve Prometheus metrics on https://BIND:PORT/metrics (the server certificate; an"
        " operator token as 'Authorization: Bearer', as `fleetpki serve`'s /metrics)."
    ),
]
KeepaliveOpt = Annotated[
    int,
    typer.Option(
        "--max-keepalive",
        help="Refuse CONNECTs asking for a keepalive above this (or 0), in seconds.",
    ),
]
MaxPacketOpt = Annotated[
    int | None,
    typer.Option(
        "--max-packet-size",
        help="Disconnect a client sending a larger MQTT packet, in bytes "
        "(default: broker.max_packet_size of the config, 262144).",
    ),
]
MaxConnOpt = Annotated[int, typer.Option("--max-connections", help="Open TLS connections at most.")]


_fail = fail


def broker_config_for_home(
    home: Path | None,
    *,
    bind: str | None = None,
    port: int | None = None,
    max_keepalive: int = 3600,
    max_connections: int = 20_000,
    max_packet_size: int | None = None,
) -> BrokerConfig:
    """The BrokerConfig of a home folder: its TLS files, chain, registry and [server] ports."""
    from enroll_server.home.config import load_config
    from enroll_server.home.layout import HomeLayout, registry_location, resolve_home

    layout = HomeLayout(resolve_home(home))
    if not layout.config.exists():
        raise FileNotFoundError(f"{layout.root}: not initialized: run `fleetpki init` first")
    cfg = load_config(layout.config)
    return BrokerConfig(
        server_cert=layout.server_cert,
        server_key=layout.server_key,
        ca_file=layout.chain,
        registry_path=registry_location(layout, cfg),
        host=bind or cfg.bind,
        port=cfg.mqtt_port if port is None else port,
        keepalive=KeepalivePolicy(max_seconds=max_keepalive),
        max_connections=max_connections,
        max_packet_size=cfg.max_packet_size if max_packet_size is None else max_packet_size,
        # The TLS handshake and CONNECT: the request-head deadline of every listener.
        connect_timeout=cfg.head_timeout.total_seconds(),
        handshake_timeout=cfg.head_timeout.total_seconds(),
    )


async def _metrics_site(
    text: Callable[[], str],
    host: str,
    port: int,
    tls: ssl.SSLContext,
    registry: Registry,
) -> web.AppRunner:
    """`GET /metrics` over HTTPS with the broker's server certificate, behind an operator's
    bearer token: the same rule as `fleetpki serve`'s admin listener (operators.operator_for),
    because the figures (connected devices, refusals by reason) are the operator's to read."""

    async def metrics(request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(
                operator_for, registry, request.headers.get("Authorization"), request.method
            )
        except ServiceError as exc:
            return web.Response(
                status=http_status(exc), text=exc.reason + "\n", headers=error_headers(exc)
            )
        return web.Response(text=text(), content_type="text/plain")

    web_app = web.Application()
    web_app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


async def follow_ca_file(path: Path, contexts: list[ssl.SSLContext], interval: float) -> None:
    """Load `path` again into `contexts` whenever it changes (until cancelled). OpenSSL's
    store only grows: an issuing CA gone from the file stays trusted until a restart, and the
    registry check refuses its certificates (retired: expired; revoked: all revoked)."""
    seen = await asyncio.to_thread(_read, path)
    while True:
        await asyncio.sleep(interval)
        now = await asyncio.to_thread(_read, path)
        if now and now != seen:
            for ctx in contexts:
                ctx.load_verify_locations(cafile=str(path))
            seen = now
            log.info("%s changed: its CAs are trusted", path)


async def serve_until_signal(
    config: BrokerConfig, metrics_port: int | None, cert_check_interval: float = CHECK_INTERVAL
) -> None:
    with listening("the MQTT broker (mTLS)", config.host, config.port, "--mqtt-port"):
        running = await start_broker(config)
    runner = None
    registry: Registry | None = None
    metrics_tls = admin_ssl_context(config.server_cert, config.server_key)
    # A certificate renewed by `fleetpki serve` or `fleetpki server-cert renew` is loaded
    # without a restart; renewing is theirs (this process holds no CA key).
    certificates = ServerCertificates(
        config.server_cert,
        config.server_key,
        [running.tls_context, metrics_tls],
        lambda: datetime.now(UTC),
        interval=cert_check_interval,
    )
    certificates.start()
    # A rollover (`fleetpki ca rollover`) adds an issuing CA to chain.pem: trusted at once.
    follow = asyncio.create_task(
        follow_ca_file(config.ca_file, [running.tls_context], cert_check_interval),
        name="fleetpki-ca-file",
    )
    try:
        if metrics_port is not None:
            registry = Registry.open(config.registry_path)
            with listening("broker metrics (HTTPS)", config.host, metrics_port, "--metrics-port"):
                runner = await _metrics_site(
                    lambda: running.metrics_text() + certificates.metrics_text(),
                    config.host,
                    metrics_port,
                    metrics_tls,
                    registry,
                )
        err.print(f"MQTT (mTLS) on {config.host}:{running.port}; Ctrl-C to stop", highlight=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        follow.cancel()
        await certificates.stop()
        if runner is not None:
            await runner.cleanup()
        if registry is not None:
            registry.close()
        await running.stop()


def _run(
    home: Path | None,
    bind: str | None,
    port: int | None,
    metrics_port: int | None,
    max_keepalive: int,
    max_connections: int,
    max_packet_size: int | None,
) -> None:
    from enroll_server.home.config import ConfigError
    from enroll_server.home.layout import HomeError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = broker_config_for_home(
            home,
            bind=bind,
            port=port,
            max_keepalive=max_keepalive,
            max_connections=max_connections,
            max_packet_size=max_packet_size,
        )
        from enroll_server.transport.loop import install_fast_loop

        install_fast_loop()  # uvloop when installed, as `fleetpki serve` does
        asyncio.run(serve_until_signal(config, metrics_port))
    except (
        HomeError,
        ConfigError,
        BrokerError,
        FileNotFoundError,
        ValueError,
        ListenFailed,
    ) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen: {exc}")


@app.callback(invoke_without_command=True)
def broker(
    ctx: typer.Context,
    home: HomeOpt = None,
    bind: HostOpt = None,
    mqtt_port: PortOpt = None,
    metrics_port: MetricsOpt = None,
    max_keepalive: KeepaliveOpt = 3600,
    max_connections: MaxConnOpt = 20_000,
    max_packet_size: MaxPacketOpt = None,
) -> None:
    """Run the broker alone (same registry as `fleetpki serve`; revocations from any process
    reach it within a second). Subcommands: see --help."""
    if ctx.invoked_subcommand is None:
        _run(home, bind, mqtt_port, metrics_port, max_keepalive, max_connections, max_packet_size)


@app.command("run")
def run(
    home: HomeOpt = None,
    bind: HostOpt = None,
    mqtt_port: PortOpt = None,
    metrics_port: MetricsOpt = None,
    max_keepalive: KeepaliveOpt = 3600,
    max_connections: MaxConnOpt = 20_000,
    max_packet_size: MaxPacketOpt = None,
) -> None:
    """Run the broker alone (the same as `fleetpki broker` without a subcommand)."""
    _run(home, bind, mqtt_port, metrics_port, max_keepalive, max_connections, max_packet_size)
