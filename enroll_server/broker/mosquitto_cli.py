"""`fleetpki broker mosquitto-config|mosquitto-sync`: run mosquitto as the production broker."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from enroll_server.broker.issuer_crls import IssuerCrls
from enroll_server.broker.mosquitto_config import (
    DEFAULT_ADMIN_PORT,
    BrokerMaterial,
    MosquittoFiles,
    MosquittoSettings,
    SyncSettings,
    find_dynsec_plugin,
    write_mosquitto_config,
)
from enroll_server.broker.mosquitto_dynsec import close_quietly, open_control
from enroll_server.broker.mosquitto_errors import MosquittoError
from enroll_server.broker.mosquitto_sync import (
    DEFAULT_SYNC_INTERVAL,
    RECHECK_DELAYS,
    MosquittoSync,
    read_cursor,
    read_pid,
    service_names,
)
from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, error_exit
from enroll_server.cli.options import HomeOpt
from enroll_server.home.config import ConfigError
from enroll_server.home.layout import (
    HomeError,
    LoadedHome,
    load_home,
    registry_location,
    resolve_home,
)
from enroll_server.pki.errors import PkiError
from enroll_server.registry import Registry, RegistryError
from fleetpki.packet_size import check_max_packet_size

app = typer.Typer(
    help="mosquitto as the broker: configuration, CRL sync and live session drop.",
    no_args_is_help=True,
)
console = stdout_console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


_fail = error_exit


def _load(home: Path | None) -> LoadedHome:
    try:
        return load_home(resolve_home(home))
    except (HomeError, ConfigError, PkiError) as exc:
        raise _fail(str(exc)) from exc


def _saved_settings(out: Path) -> MosquittoSettings | None:
    """The settings an earlier mosquitto-config wrote into `out` (None: none readable)."""
    files = MosquittoFiles(out)
    if not files.sync_settings.exists():
        return None
    try:
        return SyncSettings.load(files).config
    except MosquittoError:
        return None


def until_signalled(run: Callable[[threading.Event], None]) -> None:
    """Run a syncer's loop until SIGTERM or SIGINT sets its stop event."""
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run(stop)


@app.command("mosquitto-config")
def mosquitto_config(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write mosquitto.conf and its files.")
    ],
    home: HomeOpt = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Device listener port (default: as before, else mqtt_port of the config)."
        ),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option(
            help="Device listener address (default: as before, else 127.0.0.1; "
            "0.0.0.0 serves every interface)."
        ),
    ] = None,
    admin_port: Annotated[
        int | None,
        typer.Option(
            help=f"Loopback port of the dynamic-security control listener "
            f"(default: as before, else {DEFAULT_ADMIN_PORT})."
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            help="Account mosquitto drops to when started as root (default: as "
            "before, else mosquitto)."
        ),
    ] = None,
    plugin: Annotated[
        Path | None,
        typer.Option(
            help="Path of mosquitto_dynamic_security.so (default: as before, else search)."
        ),
    ] = None,
    live_drop: Annotated[
        bool,
        typer.Option(
            "--live-drop/--no-live-drop",
            help="Drop live sessions of revoked devices (needs the dynamic-security plugin).",
        ),
    ] = True,
    max_packet_size: Annotated[
        int | None,
        typer.Option(
            help="Disconnect a client sending a larger MQTT packet, in bytes (default: as "
            "before, else broker.max_packet_size of the config)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Rewrite an existing configuration folder (its settings are kept)."
        ),
    ] = False,
) -> None:
    """Write a mosquitto 2.0 configuration: mTLS device listener with CRL, the ACL of
    fleetpki.topics for devices and services, TLS 1.2+ AEAD only, a maximum packet size."""
    loaded = _load(home)
    layout = loaded.layout
    files = MosquittoFiles(out.absolute())
    if files.conf.exists() and not force:
        raise _fail(
            f"{files.conf} exists (a mosquitto may be running from it); pass --force to "
            "rewrite it (its port, bind, admin port, user and packet size are kept unless given)"
        )
    before = _saved_settings(files.folder) or MosquittoSettings(
        port=loaded.config.mqtt_port, max_packet_size=loaded.config.max_packet_size
    )
    try:
        if not live_drop:
            plugin_path = None
        else:
            plugin_path = plugin or before.plugin or find_dynsec_plugin()
        packet_size = check_max_packet_size(
            before.max_packet_size if max_packet_size is None else max_packet_size
        )
    except (MosquittoError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    settings = MosquittoSettings(
        port=before.port if port is None else port,
        bind=before.bind if bind is None else bind,
        admin_port=before.admin_port if admin_port is None else admin_port,
        user=before.user if user is None else user,
        plugin=plugin_path,
        max_packet_size=packet_size,
    )
    try:
        with Registry.open(registry_location(layout)) as registry:
            # One CRL per live issuing CA (after a rollover, home.issuers) in one crlfile.
            crls = IssuerCrls(registry, loaded, next_update=loaded.config.crl_next_update)
            published = crls.publish(datetime.now(UTC))
            services = service_names(registry)
        material = BrokerMaterial(
            ca_chain_pem=layout.chain.read_bytes(),
            server_chain_pem=layout.server_cert.read_bytes(),
            server_key_pem=layout.server_key.read_bytes(),
            crl_pem=published.pem,
        )
        files = write_mosquitto_config(files.folder, material, settings, crls.event_seq, services)
    except (OSError, RegistryError, MosquittoError, HomeError, PkiError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"wrote {files.conf} (CRL #{published.number}, {published.entries} entries)")
    where = "every interface" if settings.bind in ("0.0.0.0", "::") else settings.bind
    console.print(
        f"devices: {where} port {settings.port}; max packet {settings.max_packet_size} bytes; "
        f"{len(services)} service identities in the ACL"
    )
    if settings.bind in ("127.0.0.1", "::1", "localhost"):
        console.print("loopback only: rerun with --force --bind 0.0.0.0 to serve a network")
    console.print(f"run:  mosquitto -c {files.conf}")
    console.print(
        f"then: fleetpki broker mosquitto-sync --home {layout.root} --conf-dir {files.folder}"
    )
    if not settings.live_drop:
        console.print(
            "live drop is off: revoked devices are refused at their next connect only",
            style="yellow",
        )


@app.command("mosquitto-sync")
def mosquitto_sync(
    conf_dir: Annotated[
        Path, typer.Option("--conf-dir", help="The folder mosquitto-config wrote.")
    ],
    home: HomeOpt = None,
    pid: Annotated[int | None, typer.Option(help="mosquitto's process id.")] = None,
    pidfile: Annotated[
        Path | None,
        typer.Option(help="mosquitto's pid file (default: CONF_DIR/mosquitto.pid)."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between registry polls.")
    ] = DEFAULT_SYNC_INTERVAL,
) -> None:
    """Keep mosquitto's CRL and TLS server certificate current (files + SIGHUP) and end revoked
    devices' live sessions."""
    if pid is not None and pidfile is not None:
        raise _fail("give --pid or --pidfile, not both")
    loaded = _load(home)
    files = MosquittoFiles(conf_dir)
    if not files.conf.exists():
        raise _fail(f"{conf_dir}: no mosquitto.conf; run `fleetpki broker mosquitto-config`")
    pid_source = files.pidfile if pidfile is None else pidfile

    def current_pid() -> int:
        return pid if pid is not None else read_pid(pid_source)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        registry = Registry.open(loaded.registry)
        control = open_control(files)
    except (OSError, RegistryError, MosquittoError) as exc:
        raise _fail(str(exc)) from exc
    try:
        try:
            crls = IssuerCrls(
                registry,
                loaded,
                next_update=loaded.config.crl_next_update,
                since_seq=read_cursor(files),
            )
        except (HomeError, PkiError) as exc:
            raise _fail(str(exc)) from exc
        sync = MosquittoSync(
            crls,
            files,
            current_pid,
            control,
            lambda: datetime.now(UTC),
            server_pair=(loaded.layout.server_cert, loaded.layout.server_key),
            services=lambda: service_names(registry),
            ca_chain=loaded.layout.chain,
        )
        if once:
            try:
                done = sync.step()
                sync.finish(max_wait=RECHECK_DELAYS[0])
            except MosquittoError as exc:
                raise _fail(str(exc), code=ExitCode.FAILED) from exc
            console.print(
                f"CRL #{done.crl_number} loaded; dropped {len(done.dropped)} session(s)"
                + (f": {', '.join(done.dropped)}" if done.dropped else "")
            )
            return
        console.print(f"syncing {files.conf} every {interval:g} s (Ctrl-C to stop)")
        until_signalled(lambda stop: sync.run(interval, stop))
    finally:
        close_quietly(control)
        registry.close()
