"""The `fleetpki` operator CLI: init, serve, devices, services; other areas mount sub-apps."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from rich.console import Console
from rich.table import Table

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, error_exit, fail
from enroll_server.cli.help import tidy_help
from enroll_server.cli.options import (
    HomeOpt,
    JsonOpt,
    ReasonOpt,
    RegistryOpt,
    fail_registry,
    init_port,
    serve_port,
)
from enroll_server.enrollment.outcome import transition_outcome
from enroll_server.home.config import ConfigError, ServerConfig
from enroll_server.home.layout import HomeError, check_new_home, init_home, resolve_home
from enroll_server.pki.ca import Issuer, check_hostname
from enroll_server.pki.errors import PkiError, UnsupportedKey
from enroll_server.pki.keys import KeyType, parse_key_type
from enroll_server.pki.signer import Pkcs11Signer
from enroll_server.registry import (
    InvalidValue,
    Registry,
    RegistryError,
    UnknownDevice,
    parse_reason,
)
from enroll_server.registry.errors import (
    NoSchema,
    RegistryUnavailable,
    SchemaTooNew,
    SchemaTooOld,
)
from enroll_server.registry.location import (
    PostgresLocation,
    RegistryLocation,
    SqliteLocation,
    has_password,
    parse_location,
)
from fleetpki.clock import utc_now
from fleetpki.identity import DeviceId, InvalidIdentifier
from fleetpki.packet_size import check_max_packet_size

app = typer.Typer(
    name="fleetpki",
    help="IoT device enrollment (EST), mTLS MQTT broker and revocation, for operators.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
device_app = typer.Typer(help="Inspect devices and change their state.", no_args_is_help=True)
app.add_typer(device_app, name="device")

console = stdout_console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _home(home: Path | None) -> Path:
    try:
        return resolve_home(home)
    except HomeError as exc:
        fail(str(exc))
        raise  # unreachable


def _token_key(
    root: Path, cfg: ServerConfig, flag: str, key_uri: str, pin_file: Path | None
) -> tuple[ServerConfig, Pkcs11Signer]:
    """`init --ca-key` / `--root-key`: a CA key in its token (made there if absent), and the
    config that names it: URI, module, PIN file path; never the PIN."""
    from enroll_server.home.layout import TOKEN_CURVES, HomeLayout, token_key_signer
    from enroll_server.pki.signer import BadKeyUri, SignerError, module_path, parse_pkcs11_uri

    if cfg.key_type not in TOKEN_CURVES:
        fail(f"{flag} makes an EC key in the token: use --key-type ec-p256 or ec-p384")
    try:
        uri = parse_pkcs11_uri(key_uri)
    except BadKeyUri as exc:
        fail(f"{flag}: {exc}")
    if flag == "--root-key":
        cfg = replace(cfg, root_key=str(uri))
    else:
        cfg = replace(cfg, ca_key=str(uri))
    cfg = replace(
        cfg,
        pkcs11_module=module_path(None, uri),
        pkcs11_pin_file=str(pin_file.resolve()) if pin_file is not None else "",
    )
    try:
        signer = token_key_signer(
            HomeLayout(root), cfg, str(uri), create=True, curve=TOKEN_CURVES[cfg.key_type]
        )
    except SignerError as exc:
        fail(str(exc), ExitCode.FAILED)
    return cfg, signer


def _same_key(a: str, b: str) -> bool:
    """Two key URIs naming the same key (a malformed one is reported by _token_key)."""
    from enroll_server.pki.signer import BadKeyUri, parse_pkcs11_uri

    try:
        return parse_pkcs11_uri(a) == parse_pkcs11_uri(b)
    except BadKeyUri:
        return False


def _new_registry(root: Path, registry: str | None, password_file: str | None) -> RegistryLocation:
    """The registry `init` creates: H/registry.db, or an empty PostgreSQL database (checked
    before any file is written: unreachable, or holding a fleetpki registry already, is
    refused with nothing made)."""
    from enroll_server.home.layout import HomeLayout

    layout = HomeLayout(root)
    try:
        location = parse_location(registry) if registry else SqliteLocation(layout.registry)
    except InvalidValue as exc:
        fail(f"--registry: {exc.why}")
    if isinstance(location, SqliteLocation):
        if password_file:
            fail("--registry-password-file is for a PostgreSQL registry (--registry postgresql://)")
        return location
    if has_password(location.url):
        fail(
            f"--registry {location}: fleetpki.toml never holds a password; give it with "
            "--registry-password-file, PGPASSWORD or ~/.pgpass"
        )
    pw = (root / password_file) if password_file else None
    location = replace(location, password_file=pw)
    try:
        Registry.open(location).close()
    except NoSchema:
        return location  # empty: init makes the schema
    except RegistryError as exc:
        fail_registry(exc)
    fail(
        f"--registry {location} already holds a fleetpki registry; point a new node at it "
        "with its own home (`fleetpki node add`), or give init an empty database"
    )


def _configured(root: Path, location: RegistryLocation) -> str:
    """fleetpki.toml's `registry` for `location`: "" for the default H/registry.db."""
    from enroll_server.home.layout import HomeLayout

    if isinstance(location, PostgresLocation):
        return location.url
    if location.path.resolve() == HomeLayout(root).registry.resolve():
        return ""
    return f"sqlite:///{location.path.resolve()}"


def open_registry(home: Path | None) -> Registry:
    from enroll_server.home.layout import HomeLayout, registry_location

    root = _home(home)
    layout = HomeLayout(root)
    if not layout.config.exists():
        fail(f"{root}: not initialized: run `fleetpki init --home {root}` first")
    return Registry.open(registry_location(layout))


@app.command()
def init(
    home: HomeOpt = None,
    hostname: Annotated[
        list[str] | None,
        typer.Option("--hostname", help="Extra server host name or IP (repeatable)."),
    ] = None,
    key_type: Annotated[
        str, typer.Option("--key-type", help="CA and server key type.")
    ] = "ec-p256",
    public_host: Annotated[
        str | None,
        typer.Option(
            help="Name devices use to reach the server (default: first --hostname or localhost)."
        ),
    ] = None,
    est_port: Annotated[int, init_port("HTTPS port for EST (in bundles).")] = 8443,
    http_port: Annotated[int, init_port("Plain HTTP port for CRL and OCSP (in URLs).")] = 8080,
    mqtt_port: Annotated[int, init_port("MQTT over TLS port (in bundles).")] = 8883,
    admin_port: Annotated[int, init_port("HTTPS port for the admin API and /metrics.")] = 8444,
    device_validity: Annotated[str, typer.Option(help="Device certificate lifetime.")] = "30d",
    force: Annotated[bool, typer.Option(help="Overwrite an existing home.")] = False,
    registry: RegistryOpt = None,
    registry_password_file: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL registry: a file (relative to the home) holding the password; "
            "written to fleetpki.toml, the password itself never is."
        ),
    ] = None,
    ca_key: Annotated[
        str | None,
        typer.Option(
            "--ca-key",
            help="The issuing CA key in a PKCS#11 token: pkcs11:token=LABEL;object=LABEL "
            "(RFC 7512); made there, non-extractable, unless it exists. Module: "
            "FLEETPKI_PKCS11_MODULE or the URI's module-path (default SoftHSM2's).",
        ),
    ] = None,
    root_key: Annotated[
        str | None,
        typer.Option(
            "--root-key",
            help="The root CA key in a PKCS#11 token, like --ca-key (another object; the same "
            "module and PIN); the home keeps no root.key.",
            show_default=False,
        ),
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(
            "--pin-file",
            help="With --ca-key / --root-key: a file holding the token PIN (else "
            "FLEETPKI_PKCS11_PIN); its path goes to fleetpki.toml, the PIN never does.",
        ),
    ] = None,
    root_offline: Annotated[
        Path | None,
        typer.Option(
            "--root-offline",
            help="Write the root key (encrypted with the root passphrase) and certificate only "
            "to DIR (removable media); the home keeps root.pem, never the root key.",
            show_default=False,
        ),
    ] = None,
    root_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--root-passphrase-file",
            help="With --root-offline: a file holding the root passphrase (else "
            "$FLEETPKI_ROOT_PASSPHRASE); 12+ characters, kept apart from DIR and the home.",
            show_default=False,
        ),
    ] = None,
    root_crl_days: Annotated[
        int,
        typer.Option(
            "--root-crl-days", min=1, help="With --root-offline: the root CRL's lifetime."
        ),
    ] = 365,
    external_root: Annotated[
        bool,
        typer.Option(
            "--external-root",
            help="Your own PKI signs the issuing CA: make its key and H/ca/issuing.csr, then "
            "wait for `fleetpki ca import-issuing CERT CHAIN`.",
        ),
    ] = False,
) -> None:
    """Create the CA hierarchy, the TLS server certificate, the registry and an admin token."""
    from fleetpki.duration import InvalidDuration, parse_duration

    root = _home(home)
    location = _new_registry(root, registry, registry_password_file)
    try:
        kind = parse_key_type(key_type)
        validity = parse_duration(device_validity)
    except (UnsupportedKey, InvalidDuration) as exc:
        fail(str(exc))
        raise
    try:
        extra = [check_hostname(h) for h in hostname or []]
    except ValueError as exc:
        fail(f"--hostname {exc}")
        raise
    hosts = [
        "localhost",
        "127.0.0.1",
        "::1",
        *[h for h in extra if h not in ("localhost", "127.0.0.1", "::1")],
    ]
    cfg = ServerConfig(
        key_type=kind,
        hostnames=tuple(hosts),
        public_host=public_host or (extra[0] if extra else "localhost"),
        est_port=est_port,
        http_port=http_port,
        mqtt_port=mqtt_port,
        admin_port=admin_port,
        device_validity=validity,
        registry=_configured(root, location),
        registry_password_file=registry_password_file or "",
    )
    if external_root and root_offline is not None:
        fail("--external-root and --root-offline exclude each other: whose root is it?")
    if root_key is not None and (external_root or root_offline is not None):
        which = "--external-root" if external_root else "--root-offline"
        fail(
            f"--root-key and {which} exclude each other: --root-key keeps the root key in a "
            "token, which is its own offline medium (unplug it between ceremonies)"
        )
    try:
        check_new_home(root, force=force)  # before a key is made in a token or DIR
        keep_root = _offline_root(root_offline, root_passphrase_file)
    except HomeError as exc:
        fail(str(exc))
    if keep_root is not None:
        cfg = replace(cfg, root="offline")
    if root_key is not None and ca_key is not None and _same_key(root_key, ca_key):
        fail("--root-key and --ca-key name the same key: the root and the issuing CA need two")
    signer = root_signer = None
    if root_key is not None:
        cfg, root_signer = _token_key(root, cfg, "--root-key", root_key, pin_file)
    if ca_key is not None:
        cfg, signer = _token_key(root, cfg, "--ca-key", ca_key, pin_file)
    now = utc_now()
    if external_root:
        _init_external(root, cfg, location, force, signer, now)
        return
    try:
        result = init_home(
            root,
            cfg,
            now,
            force=force,
            issuing_signer=signer,
            root_signer=root_signer,
            keep_root=keep_root,
            root_crl_lifetime=timedelta(days=root_crl_days),
        )
    except HomeError as exc:
        fail(str(exc))
        raise
    _init_registry(location, result.admin_token, now, kind, hosts)
    console.print(f"[green]initialized[/green] {root}")
    console.print(f"  root CA      {result.layout.root_cert}  (give this to devices as ca.pem)")
    if root_offline is not None:
        console.print(
            f"  root key     {root_offline}/root.key only (offline; its passphrase is yours, "
            f"not in the home); root CRL valid {root_crl_days} days: re-sign it with "
            "`fleetpki ca sign-root-crl --root DIR`",
            markup=False,
        )
    if cfg.root_key:
        console.print(
            f"  root key     {cfg.root_key}  (in the token, not extractable)", markup=False
        )
    console.print(f"  issuing CA   {result.layout.issuing_cert}")
    if cfg.ca_key:
        console.print(f"  issuing key  {cfg.ca_key}  (in the token, not extractable)", markup=False)
    console.print(f"  TLS server   {result.layout.server_cert}  SANs: {', '.join(hosts)}")
    console.print(f"  registry     {location}")
    console.print(f"  admin token  {result.layout.admin_token}  (0600; keep it secret)")


def _offline_root(
    root_dir: Path | None, passphrase_file: Path | None
) -> Callable[[Issuer, x509.CertificateRevocationList], None] | None:
    """`init --root-offline DIR`: where init hands the root key (DIR, checked and the root
    passphrase read before anything is made), or None for a root in the home."""
    from enroll_server.home.layout import PASSPHRASE_ENV
    from enroll_server.home.root import (
        check_offline_folder,
        new_root_passphrase,
        write_offline_root,
    )

    if root_dir is None:
        if passphrase_file is not None:
            fail("--root-passphrase-file goes with --root-offline DIR")
        return None
    check_offline_folder(root_dir)
    home_phrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    phrase = new_root_passphrase(passphrase_file, root_dir, home_phrase)
    return partial(write_offline_root, root_dir, phrase)


def _init_registry(
    location: RegistryLocation, admin_token: str, now: datetime, kind: KeyType, hosts: list[str]
) -> None:
    from enroll_server.enrollment.operators import set_admin_token

    with Registry.open(location, create=True) as reg:
        if isinstance(location, SqliteLocation):
            # Token hashes and the audit trail: operator-only, like the CA files.
            os.chmod(location.path, 0o600)
        set_admin_token(reg, admin_token, now, actor="cli")
        reg.append_audit(
            actor="cli",
            action="ca.init",
            device_id=None,
            detail={"key_type": kind.value, "hostnames": hosts},
            now=now,
        )


def _init_external(
    root: Path,
    cfg: ServerConfig,
    location: RegistryLocation,
    force: bool,
    signer: Pkcs11Signer | None,
    now: datetime,
) -> None:
    """`init --external-root`: the issuing CA key and its request; the rest at import-issuing."""
    from enroll_server.home.external_root import init_external_home

    try:
        pending = init_external_home(root, cfg, force=force, issuing_signer=signer)
    except HomeError as exc:
        fail(str(exc))
    _init_registry(location, pending.admin_token, now, cfg.key_type, list(cfg.hostnames))
    console.print(f"[green]initialized[/green] {root}: waiting for the issuing CA certificate")
    console.print(f"  request      {pending.layout.issuing_csr}  (have your PKI sign it as a CA)")
    console.print(
        "  next         fleetpki ca import-issuing CERT CHAIN  (CHAIN: your CAs up to the root)",
        markup=False,
    )
    console.print(f"  admin token  {pending.layout.admin_token}  (0600; keep it secret)")


@app.command()
def serve(
    home: HomeOpt = None,
    est_port: Annotated[int | None, serve_port("HTTPS port for EST.")] = None,
    http_port: Annotated[int | None, serve_port("Plain HTTP port for CRL and OCSP.")] = None,
    mqtt_port: Annotated[int | None, serve_port("MQTT over TLS port.")] = None,
    admin_port: Annotated[int | None, serve_port("HTTPS port for the admin API, /metrics.")] = None,
    no_broker: Annotated[
        bool, typer.Option("--no-broker", help="Do not run the embedded broker.")
    ] = False,
    bind: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (default: server.bind, 127.0.0.1: this machine only; "
            "0.0.0.0: every interface, to serve devices on the network)."
        ),
    ] = None,
    admin_bind: Annotated[
        str | None,
        typer.Option(help="Address of the admin listener (default: server.admin_bind, 127.0.0.1)."),
    ] = None,
    max_packet_size: Annotated[
        int | None,
        typer.Option(
            help="Broker: disconnect a client sending a larger MQTT packet, in bytes "
            "(default: broker.max_packet_size of the config, 262144)."
        ),
    ] = None,
    registry: RegistryOpt = None,
) -> None:
    """Run EST (HTTPS), CRL + OCSP (HTTP), the admin API (HTTPS, loopback) and the broker."""
    from enroll_server.home.server_certificate import ServerCertificateError
    from enroll_server.transport.listen import ListenFailed
    from enroll_server.transport.loop import install_fast_loop
    from enroll_server.wiring.runtime import run_service
    from provisioning.admin import Provisioning

    root = _home(home)
    if max_packet_size is not None:
        try:
            check_max_packet_size(max_packet_size)
        except ValueError as exc:
            fail(str(exc))
    install_fast_loop()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(
            run_service(
                root,
                est_port=est_port,
                http_port=http_port,
                mqtt_port=mqtt_port,
                admin_port=admin_port,
                broker=not no_broker,
                bind=bind,
                admin_bind=admin_bind,
                max_packet_size=max_packet_size,
                registry_at=registry,
                provisioner=Provisioning(),
            )
        )
    except (HomeError, ConfigError, PkiError, ServerCertificateError, ListenFailed) as exc:
        fail(str(exc))
    except (RegistryUnavailable, NoSchema, SchemaTooOld, SchemaTooNew) as exc:
        # A registry this node cannot use: unreachable, refusing the login, or another
        # version's schema (a node never migrates a shared one by itself).
        fail_registry(exc)
    except InvalidValue as exc:
        fail(str(exc))


def _parse_device(device_id: str) -> DeviceId:
    try:
        return DeviceId.parse(device_id)
    except InvalidIdentifier as exc:
        fail(str(exc))
        raise


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@device_app.command("list")
def device_list(
    home: HomeOpt = None,
    state: Annotated[
        str | None, typer.Option(help="provisioned, active, suspended or revoked")
    ] = None,
    batch: Annotated[str | None, typer.Option(help="Only devices of this batch.")] = None,
    limit: int = 1000,
    as_json: JsonOpt = False,
) -> None:
    """List devices."""
    from enroll_server.web.admin_api import device_json

    with open_registry(home) as registry:
        try:
            devices = registry.list_devices(state=state, batch_id=batch, limit=limit)
        except InvalidValue as exc:
            fail(str(exc))
            raise
    if as_json:
        _print_json([device_json(d) for d in devices])
        return
    table = Table("device", "state", "batch", "role", "enrolled at")
    for d in devices:
        table.add_row(
            d.device_id.value,
            d.state.value,
            d.batch_id or "-",
            d.role.value,
            d.enrolled_at.isoformat(timespec="seconds") if d.enrolled_at else "-",
        )
    console.print(table)


@device_app.command("show")
def device_show(device_id: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show one device, its certificates and recent audit entries."""
    from enroll_server.web.admin_api import certificate_json, device_json

    did = _parse_device(device_id)
    with open_registry(home) as registry:
        device = registry.get_device(did)
        if device is None:
            fail(str(UnknownDevice(did)), ExitCode.NOT_FOUND)
        certs = registry.certificates_of(did)
        audit = registry.audit_log(device_id=did, limit=20)
    data = {**device_json(device), "certificates": [certificate_json(c) for c in certs]}
    if as_json:
        _print_json(data)
        return
    for key in (
        "device_id",
        "state",
        "role",
        "batch_id",
        "created_at",
        "enrolled_at",
        "token_expires_at",
    ):
        console.print(f"{key:>17}: {data[key]}")
    table = Table("serial", "status", "not after", "reason")
    for c in certs:
        table.add_row(
            f"{c.serial:x}",
            c.status.value,
            c.not_after.isoformat(timespec="seconds"),
            c.revocation_reason or "",
        )
    console.print(table)
    for e in audit:
        console.print(f"  {e.at.isoformat(timespec='seconds')} {e.actor:>10} {e.action}")


def _transition(action: str, device_id: str, home: Path | None, reason: str) -> None:
    did = _parse_device(device_id)
    now = utc_now()
    with open_registry(home) as registry:
        try:
            device = registry.get_device(did)
            if device is None:
                raise UnknownDevice(did)
            if action == "revoke":
                serials = registry.revoke_device(
                    did, reason=parse_reason(reason), now=now, actor="cli"
                )
            elif action == "suspend":
                serials = registry.suspend_device(did, now=now, actor="cli")
            else:
                serials = registry.resume_device(did, now=now, actor="cli")
        except UnknownDevice as exc:
            fail(str(exc), ExitCode.NOT_FOUND)
        except (InvalidValue, RegistryError) as exc:
            fail(str(exc))
    console.print(f"{did}: {transition_outcome(action, device.state, serials)}", highlight=False)


@device_app.command("revoke")
def device_revoke(
    device_id: str,
    home: HomeOpt = None,
    reason: ReasonOpt = "unspecified",
) -> None:
    """Revoke every unexpired certificate of a device (final for them; `device readmit` lets it
    enroll again with a new key)."""
    _transition("revoke", device_id, home, reason)


@device_app.command("suspend")
def device_suspend(device_id: str, home: HomeOpt = None) -> None:
    """Put a device's certificates on hold (certificateHold); reversible with resume."""
    _transition("suspend", device_id, home, "certificateHold")


@device_app.command("resume")
def device_resume(device_id: str, home: HomeOpt = None) -> None:
    """Lift a suspension (removeFromCRL)."""
    _transition("resume", device_id, home, "removeFromCRL")


def _mount_sub_apps() -> None:
    """Sub-apps live with their area: `batch` (provisioning), `broker` (+ mosquitto),
    `server-cert`, simulators."""
    from enroll_server.broker import cli as broker_cli
    from enroll_server.broker import mosquitto_cli, rabbitmq_cli
    from enroll_server.cli import backup as backup_cli
    from enroll_server.cli import ca as ca_cli
    from enroll_server.cli import ca_issuers as ca_issuers_cli
    from enroll_server.cli import certificate as certificate_cli
    from enroll_server.cli import node as node_cli
    from enroll_server.cli import operator as operator_cli
    from enroll_server.cli import registry as registry_cli
    from enroll_server.cli import server_certificate as server_certificate_cli
    from enroll_server.cli import service as service_cli
    from provisioning import cli as batch_cli
    from simulators import cli as simulators_cli

    app.add_typer(batch_cli.app, name="batch")
    # Re-key and readmit hand out a token, with reissue-token's bundle and output.
    device_app.command("rekey")(batch_cli.device_rekey)
    device_app.command("readmit")(batch_cli.device_readmit)
    app.add_typer(server_certificate_cli.app, name="server-cert")
    app.add_typer(certificate_cli.app, name="cert")
    app.add_typer(service_cli.app, name="service")
    app.add_typer(registry_cli.app, name="registry")
    app.add_typer(node_cli.app, name="node")
    # Issuing-CA rollover and revocation, beside the root ceremonies.
    ca_cli.app.command("rollover")(ca_issuers_cli.rollover)
    ca_cli.app.command("revoke-issuing")(ca_issuers_cli.revoke_issuing)
    app.add_typer(ca_cli.app, name="ca")
    backup_cli.register(app)
    for command in (*mosquitto_cli.app.registered_commands, *rabbitmq_cli.app.registered_commands):
        broker_cli.app.registered_commands.append(command)
    app.add_typer(broker_cli.app, name="broker")
    simulators_cli.register(app)
    operator_cli.register(app)


_mount_sub_apps()
tidy_help(app)


def main() -> None:
    try:
        app()
    except (RegistryUnavailable, NoSchema, SchemaTooOld, SchemaTooNew) as exc:
        # Any command whose registry cannot be used (the usual case: PostgreSQL down).
        code = ExitCode.FAILED if isinstance(exc, RegistryUnavailable) else ExitCode.USAGE
        raise SystemExit(error_exit(str(exc), code).exit_code) from None


if __name__ == "__main__":
    main()
