"""`fleetpki broker rabbitmq-config|rabbitmq-sync`: RabbitMQ's MQTT plugin as the broker tier."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from enroll_server.broker.issuer_crls import IssuerCrls
from enroll_server.broker.mosquitto_cli import _load, console, until_signalled
from enroll_server.broker.mosquitto_config import BrokerMaterial
from enroll_server.broker.mosquitto_sync import DEFAULT_SYNC_INTERVAL
from enroll_server.broker.rabbitmq_auth_routes import SYNC_SECRET_FILE, ensure_secret, read_secret
from enroll_server.broker.rabbitmq_config import (
    DEFAULT_MANAGEMENT_PORT,
    RabbitConfigError,
    RabbitFiles,
    RabbitSettings,
    write_rabbitmq_config,
)
from enroll_server.broker.rabbitmq_sync import (
    Management,
    PemCacheClear,
    RabbitSync,
    read_cursor,
)
from enroll_server.cli.exit_codes import ExitCode, error_exit
from enroll_server.cli.options import HomeOpt
from enroll_server.home.layout import HomeError, new_secret, registry_location
from enroll_server.pki.errors import PkiError
from enroll_server.registry import Registry, RegistryError

app = typer.Typer(no_args_is_help=True)


@app.command("rabbitmq-config")
def rabbitmq_config(
    out: Annotated[Path, typer.Option("--out", help="Folder to write RabbitMQ's files into.")],
    home: HomeOpt = None,
    port: Annotated[
        int | None, typer.Option(help="MQTT TLS listener port (default: mqtt_port of the config).")
    ] = None,
    bind: Annotated[
        str, typer.Option(help="MQTT listener address (0.0.0.0 serves every interface).")
    ] = "127.0.0.1",
    management_port: Annotated[
        int, typer.Option(help="Loopback port of the management API (rabbitmq-sync's kick).")
    ] = DEFAULT_MANAGEMENT_PORT,
    auth_url: Annotated[
        str | None,
        typer.Option(
            help="fleetpki serve's admin listener, as RabbitMQ reaches it "
            "(default: https://localhost:ADMIN_PORT of the config)."
        ),
    ] = None,
    user: Annotated[
        str, typer.Option(help="Account to hand the private files to when run as root.")
    ] = "rabbitmq",
    force: Annotated[bool, typer.Option("--force", help="Rewrite an existing folder.")] = False,
) -> None:
    """Write a RabbitMQ 3.10 configuration: MQTT over mutual TLS with certificate login, the
    CRL, and fleetpki's admin listener answering every authorisation question."""
    loaded = _load(home)
    layout = loaded.layout
    files = RabbitFiles(out.absolute())
    if files.conf.exists() and not force:
        raise error_exit(f"{files.conf} exists (a RabbitMQ may use it); pass --force to rewrite it")
    try:
        settings = RabbitSettings(
            port=loaded.config.mqtt_port if port is None else port,
            bind=bind,
            management_port=management_port,
            auth_url=auth_url or f"https://localhost:{loaded.config.admin_port}",
            user=user,
        )
    except RabbitConfigError as exc:
        raise error_exit(str(exc)) from exc
    try:
        secret = ensure_secret(layout.root, new_secret())
        ensure_secret(layout.root, new_secret(), SYNC_SECRET_FILE)
        with Registry.open(registry_location(layout)) as registry:
            # One CRL per live issuing CA (after a rollover, home.issuers).
            crls = IssuerCrls(registry, loaded, next_update=loaded.config.crl_next_update)
            published = crls.publish(datetime.now(UTC))
        material = BrokerMaterial(
            ca_chain_pem=layout.chain.read_bytes(),
            server_chain_pem=layout.server_cert.read_bytes(),
            server_key_pem=layout.server_key.read_bytes(),
            crl_pem=published.pem,
        )
        files = write_rabbitmq_config(files.folder, material, settings, secret, crls.event_seq)
    except (OSError, RegistryError, RabbitConfigError, HomeError, PkiError) as exc:
        raise error_exit(str(exc)) from exc
    console.print(f"wrote {files.folder} (CRL #{published.number}, {published.entries} entries)")
    console.print(
        f"MQTT: {settings.bind} port {settings.port}; management: 127.0.0.1 port "
        f"{settings.management_port}; authorisation: {settings.auth_url}/rabbitmq/..."
    )
    console.print(
        f"run RabbitMQ with RABBITMQ_CONFIG_FILE={files.conf} "
        f"RABBITMQ_ADVANCED_CONFIG_FILE={files.advanced} "
        f"RABBITMQ_ENABLED_PLUGINS_FILE={files.plugins}"
    )
    console.print(
        f"then: fleetpki broker rabbitmq-sync --home {layout.root} --conf-dir {files.folder}"
    )


@app.command("rabbitmq-sync")
def rabbitmq_sync(
    conf_dir: Annotated[Path, typer.Option("--conf-dir", help="The folder rabbitmq-config wrote.")],
    home: HomeOpt = None,
    management_port: Annotated[
        list[int] | None,
        typer.Option(
            help="Loopback management port of a cluster node (repeat for each; default: the "
            "one rabbitmq-config wrote)."
        ),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            help="A node (NAME@HOST) to make re-read a renewed server certificate through "
            "rabbitmqctl (repeat for each; needs its Erlang cookie)."
        ),
    ] = None,
    rabbitmqctl: Annotated[
        str, typer.Option(help="The rabbitmqctl to run for --node.")
    ] = "rabbitmqctl",
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between registry polls.")
    ] = DEFAULT_SYNC_INTERVAL,
) -> None:
    """Keep RabbitMQ's CRL file and TLS server certificate current and drop revoked or
    suspended devices' live sessions (management API; password from the home's
    rabbitmq-sync.secret)."""
    loaded = _load(home)
    files = RabbitFiles(conf_dir.absolute())
    try:
        settings = RabbitSettings.load(files)
    except RabbitConfigError as exc:
        raise error_exit(str(exc)) from exc
    password = read_secret(loaded.layout.root, SYNC_SECRET_FILE)
    if password is None:
        raise error_exit(
            f"{loaded.layout.root / SYNC_SECRET_FILE}: missing; "
            "run `fleetpki broker rabbitmq-config`"
        )
    management = Management(tuple(management_port or (settings.management_port,)), password)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        registry = Registry.open(loaded.registry)
    except (OSError, RegistryError) as exc:
        raise error_exit(str(exc)) from exc
    try:
        try:
            crls = IssuerCrls(
                registry,
                loaded,
                next_update=loaded.config.crl_next_update,
                since_seq=read_cursor(files),
            )
        except (HomeError, PkiError) as exc:
            raise error_exit(str(exc)) from exc
        sync = RabbitSync(
            crls,
            files,
            management,
            lambda: datetime.now(UTC),
            server_pair=(loaded.layout.server_cert, loaded.layout.server_key),
            reload_certificates=PemCacheClear(tuple(node), rabbitmqctl) if node else None,
            ca_chain=loaded.layout.chain,
        )
        if once:
            try:
                done = sync.step()
            except RabbitConfigError as exc:
                raise error_exit(str(exc), code=ExitCode.FAILED) from exc
            console.print(
                f"CRL #{done.crl_number} written; dropped {len(done.dropped)} session(s)"
                + (f": {', '.join(done.dropped)}" if done.dropped else "")
            )
            return
        console.print(f"syncing {files.folder} every {interval:g} s (Ctrl-C to stop)")
        until_signalled(lambda stop: sync.run(interval, stop))
    finally:
        registry.close()
