"""`fleetpki service issue|list|show|renew|revoke|readmit`: backend service identities'
lifecycle."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode
from enroll_server.cli.options import HomeOpt, JsonOpt, ReasonOpt, fail, initialized_layout
from enroll_server.enrollment.identities import (
    ServiceIdentity,
    ServiceIdentityError,
    issue_service_identity,
    readmit_service_identity,
    renew_service_identity,
    service_summary,
)
from enroll_server.enrollment.outcome import transition_outcome
from enroll_server.home.config import ConfigError, load_config
from enroll_server.home.layout import HomeError, HomeLayout, registry_location
from enroll_server.pki.errors import PkiError
from enroll_server.registry import (
    Device,
    InvalidValue,
    Registry,
    RegistryError,
    Role,
    parse_reason,
)
from fleetpki.identity import DeviceId, InvalidIdentifier

app = typer.Typer(
    help="Backend service identities (read all telemetry, send commands): issue, list, show, "
    "renew, revoke, readmit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = stdout_console(soft_wrap=True)

NameArg = Annotated[str, typer.Argument(help="Service name (its MQTT client id).")]
OutOpt = Annotated[
    Path | None,
    typer.Option(help="Folder for cert.pem, key.pem, ca.pem (default: HOME/services/NAME)."),
]


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (
        ServiceIdentityError,
        HomeError,
        ConfigError,
        InvalidIdentifier,
        PkiError,
        RegistryError,
    ) as exc:
        fail(str(exc))


def _service(registry: Registry, name: str) -> Device:
    try:
        service_id = DeviceId.parse(name)
    except InvalidIdentifier as exc:
        fail(str(exc))
    device = registry.get_device(service_id)
    if device is None or device.role is not Role.SERVICE:
        fail(f"service {name!r} is not registered", ExitCode.NOT_FOUND)
    return device


def usage_example(layout: HomeLayout, name: str, identity: ServiceIdentity) -> list[str]:
    """How to connect as service `name`: the client id must be the name (the broker binds the
    client id to the certificate's CN)."""
    config = load_config(layout.config)
    host, port = config.public_host, config.mqtt_port
    files = {k: shlex.quote(str(getattr(identity, k).absolute())) for k in ("ca", "cert", "key")}
    return [
        f"the MQTT client id must be {name!r}, the certificate's CN; for example:",
        f"  mosquitto_sub -h {host} -p {port} --cafile {files['ca']} --cert {files['cert']} "
        f"--key {files['key']} -i {name} -t 'devices/+/telemetry' -v",
        "  # paho-mqtt 2.x (Python):",
        f"  client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id={name!r})",
        f"  client.tls_set(ca_certs={str(identity.ca.absolute())!r}, "
        f"certfile={str(identity.cert.absolute())!r}, keyfile={str(identity.key.absolute())!r})",
        f"  client.connect({host!r}, {port})",
    ]


@app.command("issue")
def issue(name: NameArg, home: HomeOpt = None, out: OutOpt = None) -> None:
    """Issue a backend service identity (reads devices/+/telemetry, sends devices/+/commands)."""
    layout = initialized_layout(home)
    with _errors():
        result = issue_service_identity(layout.root, name, out, datetime.now(UTC))
        example = usage_example(layout, name, result)
    console.print(f"service identity {name}: {result.folder} (serial {result.serial:x})")
    for line in example:
        console.print(line, highlight=False, markup=False)


@app.command("renew")
def renew(name: NameArg, home: HomeOpt = None, out: OutOpt = None) -> None:
    """A new key and certificate for a service, written over its files. The old certificate
    keeps working until the broker first admits the new one (restart or reload the service),
    then it is revoked (superseded)."""
    layout = initialized_layout(home)
    with _errors():
        result = renew_service_identity(layout.root, name, out, datetime.now(UTC))
    old = "" if result.supersedes is None else f", supersedes {result.supersedes:x}"
    console.print(f"service identity {name}: {result.folder} (serial {result.serial:x}{old})")
    console.print("reload the service with the new files; the old certificate stops once it has")


@app.command("readmit")
def readmit(name: NameArg, home: HomeOpt = None, out: OutOpt = None) -> None:
    """Undo a mistaken `service revoke`: a new key and certificate; the revoked certificates
    stay revoked (CRL, OCSP)."""
    layout = initialized_layout(home)
    with _errors():
        result = readmit_service_identity(layout.root, name, out, datetime.now(UTC))
    console.print(
        f"service identity {name}: readmitted, {result.folder} (serial {result.serial:x})"
    )


@app.command("list")
def list_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List service identities with their current certificate and when to renew it."""
    with Registry.open(registry_location(initialized_layout(home))) as registry:
        rows = [service_summary(registry, s) for s in registry.list_devices(role="service")]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("service", "state", "serial", "not after", "renew by")
    for row in rows:
        table.add_row(
            *(row[k] or "-" for k in ("name", "state", "serial", "not_after", "renew_by"))
        )
    console.print(table)


@app.command("show")
def show(name: NameArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show a service, its certificates and recent audit entries."""
    from enroll_server.web.admin_api import certificate_json

    with Registry.open(registry_location(initialized_layout(home))) as registry:
        service = _service(registry, name)
        data = {
            **service_summary(registry, service),
            "certificates": [
                certificate_json(c) for c in registry.certificates_of(service.device_id)
            ],
        }
        audit = registry.audit_log(device_id=service.device_id, limit=20)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for key in ("name", "state", "serial", "not_after", "renew_by"):
        console.print(f"{key:>10}: {data[key] or '-'}", highlight=False)
    table = Table("serial", "status", "not after", "reason")
    for c in data["certificates"]:
        table.add_row(c["serial"], c["status"], c["not_after"], c["revocation_reason"] or "")
    console.print(table)
    for e in audit:
        console.print(f"  {e.at.isoformat(timespec='seconds')} {e.actor:>10} {e.action}")


@app.command("revoke")
def revoke(
    name: NameArg,
    home: HomeOpt = None,
    reason: ReasonOpt = "unspecified",
) -> None:
    """Revoke a service and every certificate of it; its live session is dropped (<1 s). One
    certificate alone: `fleetpki cert revoke SERIAL`."""
    with Registry.open(registry_location(initialized_layout(home))) as registry:
        service = _service(registry, name)
        try:
            serials = registry.revoke_device(
                service.device_id, reason=parse_reason(reason), now=datetime.now(UTC), actor="cli"
            )
        except InvalidValue as exc:
            fail(str(exc))
    console.print(f"service {name}: {transition_outcome('revoke', service.state, serials)}")
