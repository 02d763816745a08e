"""`fleetpki cert show|revoke SERIAL`: one certificate of a device or service identity."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode
from enroll_server.cli.options import HomeOpt, JsonOpt, ReasonOpt, fail, initialized_layout
from enroll_server.home.layout import registry_location
from enroll_server.registry import (
    InvalidValue,
    Registry,
    RegistryError,
    UnknownCertificate,
    parse_reason,
    parse_serial,
)

app = typer.Typer(
    help="One certificate of a device or service: show it, revoke it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = stdout_console(soft_wrap=True)

SerialArg = Annotated[
    str, typer.Argument(help="Certificate serial in hex (`device show` lists them).")
]


@app.command("show")
def show(serial: SerialArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show one certificate: its identity, status, validity and revocation."""
    from enroll_server.web.admin_api import certificate_json

    try:
        number = parse_serial(serial)
    except InvalidValue as exc:
        fail(str(exc))
    with Registry.open(registry_location(initialized_layout(home))) as registry:
        record = registry.get_certificate(number)
    if record is None:
        fail(str(UnknownCertificate(number)), ExitCode.NOT_FOUND)
        return
    data = {"device_id": record.device_id.value, **certificate_json(record)}
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for key, value in data.items():
        console.print(f"{key:>18}: {value if value is not None else '-'}", highlight=False)


@app.command("revoke")
def revoke(
    serial: SerialArg,
    home: HomeOpt = None,
    reason: ReasonOpt = "unspecified",
    as_json: JsonOpt = False,
) -> None:
    """Revoke one certificate; its device or service stays registered. The broker drops a live
    session that presented it (within 1 s), CRL and OCSP list it. Revoking an identity's
    current certificate also revokes the one it was renewed from, if still valid: the
    identity then needs `fleetpki device rekey` (devices) or `fleetpki service renew`."""
    try:
        number = parse_serial(serial)
        reason_v = parse_reason(reason)
    except InvalidValue as exc:
        fail(str(exc))
    with Registry.open(registry_location(initialized_layout(home))) as registry:
        try:
            device_id, serials = registry.revoke_certificate(
                number, reason=reason_v, now=datetime.now(UTC), actor="cli"
            )
        except UnknownCertificate as exc:
            fail(str(exc), ExitCode.NOT_FOUND)
        except RegistryError as exc:
            fail(str(exc))
    if as_json:
        data = {"device_id": device_id.value, "revoked": [f"{s:x}" for s in serials]}
        sys.stdout.write(json.dumps(data) + "\n")
    elif not serials:
        console.print(f"certificate {number:x} of {device_id} was already revoked: nothing to do")
    else:
        listed = ", ".join(f"{s:x}" for s in serials)
        console.print(
            f"{device_id}: revoked {listed} ({reason_v}); a live session presenting it is dropped",
            highlight=False,
        )
