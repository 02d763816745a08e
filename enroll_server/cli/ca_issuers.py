"""`fleetpki ca rollover` and `fleetpki ca revoke-issuing`: a new issuing CA under the same
root, and the way out when an issuing CA's key is compromised (home.issuers)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from enroll_server.cli.ca import RootPassphraseOpt, changing_ca
from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, fail
from enroll_server.cli.options import HomeOpt, JsonOpt, initialized_layout

console = stdout_console(soft_wrap=True)

RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="The offline root folder (root.pem + root.key), when the root key is not in the home.",
        show_default=False,
    ),
]


@contextmanager
def _refusals() -> Iterator[None]:
    """A home or key that refuses (exit 2, its sentence); a registry or disk that fails (1)."""
    from enroll_server.home.layout import HomeError
    from enroll_server.pki.errors import PkiError
    from enroll_server.registry.errors import RegistryError

    try:
        yield
    except (HomeError, PkiError) as exc:
        fail(str(exc))
    except RegistryError as exc:
        fail(str(exc), ExitCode.FAILED)
    except OSError as exc:
        fail(f"cannot write the CA files: {exc.strerror or exc}", ExitCode.FAILED)


def rollover(
    home: HomeOpt = None,
    root_dir: RootOpt = None,
    root_passphrase_file: RootPassphraseOpt = None,
    days: Annotated[
        int, typer.Option(min=1, help="Lifetime of the new issuing CA, in days.")
    ] = 1825,
    ca_key: Annotated[
        str | None,
        typer.Option(
            "--ca-key",
            help="The new issuing key in a PKCS#11 token, a new object (pkcs11:token=...;"
            "object=...; made there unless it exists; the PIN as for [ca] key). Required when "
            "the issuing key is in a token; a file-key home moves into the token.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll over to a new issuing CA (a new key, signed by the same root). New certificates
    come from it; the old issuing CA stays trusted, with its own CRL and OCSP, until its last
    certificate expires, then is retired by itself. A running `fleetpki serve` picks it up."""
    from functools import partial

    from enroll_server.cli.ca import new_token_key
    from enroll_server.home.issuers import crl_route, roll_over
    from enroll_server.home.layout import load_home
    from enroll_server.home.root import load_root_issuer
    from enroll_server.pki.key_id import key_id

    layout = initialized_layout(home)
    now = datetime.now(UTC)
    with _refusals(), changing_ca(layout, now) as registry:
        loaded = load_home(layout.root)
        root = load_root_issuer(layout, root_dir, root_passphrase_file)
        done = roll_over(
            layout,
            loaded.config,
            loaded.issuer,
            root,
            now,
            backfill=registry.assign_issuer,
            days=days,
            new_key=None
            if ca_key is None
            else partial(new_token_key, layout, loaded.config, ca_key, "--ca-key"),
        )
        detail = {
            "old": key_id(done.old),
            "new": key_id(done.new),
            "subject": done.new.subject.rfc4514_string(),
            "not_after": done.new.not_valid_after_utc.isoformat(),
            "crl": "/" + crl_route(layout, done.new),
        }
        registry.append_audit(
            actor="cli", action="ca.rollover", device_id=None, detail=detail, now=now
        )
    if as_json:
        sys.stdout.write(json.dumps(detail, indent=2) + "\n")
        return
    console.print(f"new issuing CA {detail['subject']} ({detail['new']})")
    console.print(f"  valid until  {detail['not_after']}")
    console.print(f"  its CRL      {detail['crl']}")
    console.print(
        f"previous issuing CA {detail['old']}: still trusted, retired by itself once its last "
        "certificate has expired"
    )


def revoke_issuing(
    issuer: Annotated[str, typer.Argument(help="The previous issuing CA's id (hex SKI).")],
    home: HomeOpt = None,
    root_dir: RootOpt = None,
    root_passphrase_file: RootPassphraseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A compromised issuing CA: the root revokes it (root CRL, reason cACompromise), every
    certificate it signed is revoked (brokers drop the sessions), and it is no longer trusted
    or served. Roll over first; then re-key each device listed (`fleetpki device rekey`)."""
    from cryptography import x509

    from enroll_server.home.issuers import revoke_issuer, revoked_issuer_entry
    from enroll_server.home.layout import ROOT_CRL_LIFETIME, load_home
    from enroll_server.home.root import ROOT_CRL_DAYS, load_root_issuer, publish_root_crl

    layout = initialized_layout(home)
    now = datetime.now(UTC)
    kid = issuer.strip().lower().replace(":", "")
    with _refusals(), changing_ca(layout, now) as registry:
        loaded = load_home(layout.root)
        root = load_root_issuer(layout, root_dir, root_passphrase_file)
        # Refused before anything changes: the current issuer, an unknown id.
        revoked = revoke_issuer(layout, loaded.config, loaded.issuer.cert, kid, now)
        devices: dict[str, None] = {}
        for serial in registry.unexpired_issued_by(kid, now):
            device, _ = registry.revoke_certificate(
                serial, reason="cACompromise", now=now, actor="cli"
            )
            devices.setdefault(device.value)
        # Signed now, whatever the age of the last; into DIR too with an offline root.
        lifetime = ROOT_CRL_LIFETIME if root_dir is None else timedelta(days=ROOT_CRL_DAYS)
        entry = revoked_issuer_entry(layout, kid)
        crl = publish_root_crl(layout, root, now, lifetime, root_dir=root_dir, revoke=[entry])
        detail = {
            "issuer": kid,
            "serial": f"{revoked.serial_number:x}",
            "devices": list(devices),
            "root_crl_number": crl.extensions.get_extension_for_class(
                x509.CRLNumber
            ).value.crl_number,
        }
        registry.append_audit(
            actor="cli", action="ca.revoke-issuing", device_id=None, detail=detail, now=now
        )
    if as_json:
        sys.stdout.write(json.dumps(detail, indent=2) + "\n")
        return
    console.print(f"issuing CA {kid} revoked by the root (root CRL #{detail['root_crl_number']})")
    console.print(f"{len(devices)} device(s) had certificates from it, now revoked; re-key each:")
    for name in devices:
        console.print(f"  fleetpki device rekey {name} --out DIR")
