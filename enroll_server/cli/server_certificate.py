"""`fleetpki server-cert show|renew`: the TLS server certificate of the EST service and broker."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from cryptography import x509
from rich.console import Console

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import fail
from enroll_server.cli.options import HomeOpt, JsonOpt
from enroll_server.home.config import ConfigError, render_config
from enroll_server.home.layout import HomeError, load_home, resolve_home
from enroll_server.home.server_certificate import ServerCertificateError, read_pair, renewal_due_at
from enroll_server.pki.ca import check_hostname
from enroll_server.pki.errors import PkiError
from fleetpki.atomic_file import write_atomic

app = typer.Typer(
    help="The TLS server certificate of the EST service and the broker: show it, renew it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = stdout_console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


_fail = fail


def describe(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    """What an operator asks of the server certificate: whom it names, and until when."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "hostnames": names,
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": not_after.isoformat(),
        "renew_at": renewal_due_at(cert).isoformat(),
        "days_left": round((not_after - now).total_seconds() / 86400, 1),
        "expired": now > not_after,
    }


def _print(info: dict[str, Any], as_json: bool, heading: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    console.print(heading)
    for key in ("subject", "hostnames", "serial", "not_before", "not_after", "renew_at"):
        value = info[key]
        console.print(f"  {key:<11} {', '.join(value) if isinstance(value, list) else value}")
    state = "[red]EXPIRED[/red]" if info["expired"] else f"{info['days_left']} days left"
    console.print(f"  {'status':<11} {state}")


@app.command("show")
def show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The certificate the service and broker present: names, serial, validity, renewal."""
    from enroll_server.home.layout import HomeLayout

    try:
        layout = HomeLayout(resolve_home(home))
        if not layout.config.exists():
            raise HomeError(layout.root, "not initialized: run `fleetpki init --home` first")
        _, _, cert = read_pair(layout.server_cert, layout.server_key)
    except (HomeError, ServerCertificateError) as exc:
        _fail(str(exc))
        raise
    _print(
        describe(cert, datetime.now(UTC)), as_json, f"TLS server certificate {layout.server_cert}"
    )


@app.command("renew")
def renew(
    home: HomeOpt = None,
    hostname: Annotated[
        list[str] | None,
        typer.Option(
            "--hostname",
            help="Add a host name or IP to the certificate and to the config (repeatable).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A new key and certificate now, for the configured host names (plus any --hostname).

    A running `fleetpki serve` or `fleetpki broker` loads it within a minute, without a
    restart; `fleetpki serve` also renews by itself at 2/3 of the lifetime.
    """
    from enroll_server.wiring.server import renew_and_record

    try:
        added = [check_hostname(h) for h in hostname or []]
    except ValueError as exc:
        _fail(f"--hostname {exc}")
        raise
    now = datetime.now(UTC)
    try:
        loaded = load_home(resolve_home(home))
    except (HomeError, ConfigError, PkiError) as exc:
        _fail(str(exc))
        raise
    config = loaded.config
    new_names = [h for h in dict.fromkeys(added) if h not in config.hostnames]
    if new_names:
        config = replace(config, hostnames=config.hostnames + tuple(new_names))
    cert = renew_and_record(loaded, now, actor="cli", config=config)
    if new_names:
        # After the certificate: a failed renewal leaves the config as it was.
        write_atomic(loaded.layout.config, render_config(config).encode(), 0o600)
    _print(describe(cert, now), as_json, f"[green]renewed[/green] {loaded.layout.server_cert}")
    if not as_json:
        console.print(
            "  A running `fleetpki serve` / `fleetpki broker` loads it within a minute; "
            "`fleetpki broker mosquitto-sync` hands it to mosquitto."
        )
