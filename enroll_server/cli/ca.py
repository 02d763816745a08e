"""`fleetpki ca`: the ceremonies of the CA lifecycle (an offline root, the operator's root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, fail
from enroll_server.cli.options import HomeOpt, initialized_layout

if TYPE_CHECKING:
    from enroll_server.home.config import ServerConfig
    from enroll_server.home.layout import HomeLayout
    from enroll_server.pki.signer import Pkcs11Signer
    from enroll_server.registry import Registry

app = typer.Typer(
    help="CA ceremonies: sign an issuing CA or the root CRL with an offline root; import an "
    "issuing CA certificate from your own PKI.",
    no_args_is_help=True,
)
console = stdout_console(soft_wrap=True)

RootDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="The offline root folder (removable media) made by init --root-offline; omit "
        "for a home whose root key is in a token (init --root-key).",
        show_default=False,
    ),
]
RootPassphraseOpt = Annotated[
    Path | None,
    typer.Option(
        "--root-passphrase-file",
        help="A file holding the offline root passphrase (else $FLEETPKI_ROOT_PASSPHRASE).",
        show_default=False,
    ),
]


def _optional_home(home: Path | None) -> HomeLayout | None:
    """The home of --home or $FLEETPKI_HOME, None when neither: a ceremony machine has none."""
    from enroll_server.home.layout import HOME_ENV

    if home is None and not os.environ.get(HOME_ENV):
        return None
    return initialized_layout(home)


def _root_at_hand(layout: HomeLayout | None, root_dir: Path | None) -> None:
    """`--root DIR`, or a home whose root key is in a token (fleetpki.toml [ca] root_key)."""
    from enroll_server.home.layout import HomeError
    from enroll_server.home.root import root_token_uri

    if root_dir is not None:
        return
    try:
        in_token = layout is not None and bool(root_token_uri(layout))
    except HomeError as exc:
        fail(str(exc))
    if not in_token:
        fail("pass --root DIR (the offline root folder), or --home H whose root key is in a token")


@contextmanager
def changing_ca(layout: HomeLayout, now: datetime) -> Iterator[Registry]:
    """The home's registry, open for a change of the home's CA files: on a shared registry
    the change is recorded there for the other nodes (home.ca_state.ca_change), after the
    home has caught up with theirs. Load the home inside the block."""
    from enroll_server.home.ca_state import ca_change
    from enroll_server.home.layout import registry_location
    from enroll_server.registry import Registry

    with Registry.open(registry_location(layout)) as registry, ca_change(layout, registry, now):
        yield registry


def _write_out(path: Path, data: bytes) -> None:
    from fleetpki.atomic_file import PUBLIC_MODE, write_atomic

    try:
        write_atomic(path, data, PUBLIC_MODE)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", ExitCode.FAILED)


@app.command("sign-issuing")
def sign_issuing(
    csr: Annotated[Path, typer.Option("--csr", help="The issuing CA's request (PEM or DER).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the certificate (PEM).")],
    root_dir: RootDirOpt = None,
    days: Annotated[int, typer.Option(min=1, help="Lifetime (capped at the root's).")] = 1825,
    crl_url: Annotated[
        str | None,
        typer.Option(
            "--crl-url",
            help="The root CRL's URL for the certificate's CDP (default with a home: its "
            "/root.crl).",
        ),
    ] = None,
    home: HomeOpt = None,
    passphrase_file: RootPassphraseOpt = None,
) -> None:
    """The ceremony that needs the root: sign an issuing CA request with the offline root
    (run where DIR is mounted: the server, or an air-gapped machine without a home), or with
    the home's root key in its token (--home, no --root)."""
    from enroll_server.home.config import load_config
    from enroll_server.home.layout import HomeError
    from enroll_server.home.root import load_root_issuer
    from enroll_server.pki.ca import issuing_ca_from_csr
    from enroll_server.pki.errors import PkiError

    layout = _optional_home(home)
    _root_at_hand(layout, root_dir)
    try:
        data = csr.read_bytes()
    except OSError as exc:
        fail(f"--csr {csr}: {exc.strerror or exc}")
    try:
        request = (
            x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
        )
    except ValueError:
        fail(f"--csr {csr}: not a PKCS#10 request (PEM or DER)")
    if crl_url is None and layout is not None:
        crl_url = load_config(layout.config).urls().root_crl
    try:
        root = load_root_issuer(layout, root_dir, passphrase_file)
        cert = issuing_ca_from_csr(request, root, datetime.now(UTC), days, crl_url)
    except HomeError as exc:
        fail(str(exc))
    except PkiError as exc:
        fail(f"--csr {csr}: {exc}")
    pem = serialization.Encoding.PEM
    _write_out(out, cert.public_bytes(pem) + root.cert.public_bytes(pem))
    console.print(f"signed {cert.subject.rfc4514_string()} until {cert.not_valid_after_utc}")
    console.print(f"  {out}: the issuing CA certificate, then the root", markup=False)
    if crl_url is None:
        console.print("  no CRL Distribution Point (give --crl-url or --home)")


@app.command("sign-root-crl")
def sign_root_crl(
    root_dir: RootDirOpt = None,
    days: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Until the CRL's nextUpdate (default 365 with --root; a token root's 30, "
            "re-signed by serve at half life).",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    passphrase_file: RootPassphraseOpt = None,
) -> None:
    """The offline root signs its next CRL: into DIR/root.crl and, with a home, H/ca/root.crl
    (a running serve publishes it within seconds). Without a home, copy DIR/root.crl over
    with `fleetpki ca import-root-crl`. A home whose root key is in a token: --home, no --root."""
    from datetime import timedelta

    from enroll_server.home.layout import ROOT_CRL_LIFETIME, HomeError
    from enroll_server.home.root import (
        ROOT_CRL_DAYS,
        OfflineRoot,
        load_root_issuer,
        publish_root_crl,
        sign_offline_root_crl,
    )
    from enroll_server.registry import RegistryError

    layout = _optional_home(home)
    _root_at_hand(layout, root_dir)
    now = datetime.now(UTC)
    try:
        with nullcontext() if layout is None else changing_ca(layout, now):
            root = load_root_issuer(layout, root_dir, passphrase_file)
            if root_dir is not None:
                crl = sign_offline_root_crl(root_dir, root, now, days or ROOT_CRL_DAYS, layout)
            else:
                lifetime = ROOT_CRL_LIFETIME if days is None else timedelta(days=days)
                crl = publish_root_crl(layout, root, now, lifetime)
    except HomeError as exc:
        fail(str(exc))
    except RegistryError as exc:
        fail(str(exc), ExitCode.FAILED)
    except OSError as exc:
        fail(f"cannot write the root CRL: {exc.strerror or exc}", ExitCode.FAILED)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    console.print(f"root CRL number {number}, nextUpdate {crl.next_update_utc}")
    if root_dir is not None:
        console.print(f"  {OfflineRoot(root_dir).crl}", markup=False)
    if layout is not None:
        console.print(f"  {layout.root_crl} (served at /root.crl)", markup=False)
    else:
        console.print("  next: fleetpki ca import-root-crl DIR/root.crl --home H (on the server)")


@app.command("import-root-crl")
def import_root_crl_command(
    crl: Annotated[Path, typer.Argument(help="A root CRL signed by sign-root-crl.")],
    home: HomeOpt = None,
) -> None:
    """Install a root CRL signed at a ceremony away from the home (checked: the home's root
    signed it, it is current, not older than the one served)."""
    from enroll_server.home.layout import HomeError
    from enroll_server.home.root import import_root_crl
    from enroll_server.registry import RegistryError

    layout = initialized_layout(home)
    now = datetime.now(UTC)
    try:
        data = crl.read_bytes()
    except OSError as exc:
        fail(f"{crl}: {exc.strerror or exc}")
    try:
        with changing_ca(layout, now):
            installed = import_root_crl(layout, data, now)
    except HomeError as exc:
        fail(str(exc))
    except RegistryError as exc:
        fail(str(exc), ExitCode.FAILED)
    except OSError as exc:
        fail(f"cannot write the root CRL: {exc.strerror or exc}", ExitCode.FAILED)
    console.print(f"root CRL installed, nextUpdate {installed.next_update_utc}")


@app.command("import-issuing")
def import_issuing_command(
    cert: Annotated[Path, typer.Argument(help="The issuing CA certificate your PKI signed.")],
    chain: Annotated[
        Path | None,
        typer.Argument(help="Your CAs above it, up to your self-signed root (PEM)."),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Complete `fleetpki init --external-root`: check the certificate (our key, a CA with
    keyCertSign + cRLSign, pathLen room for devices, valid now, signatures up to your root),
    then write the TLS server certificate, root.pem (your root: the devices' trust anchor) and
    chain.pem. Nothing is written if a check fails."""
    from enroll_server.home.external_root import import_issuing
    from enroll_server.home.layout import HomeError
    from enroll_server.pki.errors import PkiError

    layout = initialized_layout(home)
    try:
        cert_data = cert.read_bytes()
        chain_data = chain.read_bytes() if chain is not None else None
    except OSError as exc:
        fail(f"{exc.filename}: {exc.strerror or exc}")
    try:
        done = import_issuing(layout, cert_data, chain_data, datetime.now(UTC))
    except HomeError as exc:
        fail(str(exc))
    except PkiError as exc:
        fail(f"{cert}: {exc}")
    except OSError as exc:
        fail(f"cannot write the home: {exc.strerror or exc}", ExitCode.FAILED)
    issuing = done.chain.issuing
    console.print(f"[green]imported[/green] {issuing.subject.rfc4514_string()}")
    console.print(f"  root CA      {layout.root_cert}  (give this to devices as ca.pem)")
    console.print(f"  chain        {layout.chain}  ({len(done.chain.intermediates)} intermediate)")
    console.print(f"  TLS server   {layout.server_cert}")
    console.print(f"  next: fleetpki serve --home {layout.root}", markup=False)


@app.command("rollover-root")
def rollover_root_command(
    root_dir: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="The offline root folder (an offline root); omit for a root in the home.",
        ),
    ] = None,
    new_root: Annotated[
        Path | None,
        typer.Option(
            "--new-root",
            help="An offline root: a new, empty folder for the new root's key (removable "
            "media), under the same root passphrase.",
        ),
    ] = None,
    new_root_key: Annotated[
        str | None,
        typer.Option(
            "--new-root-key",
            help="A root key in a token (init --root-key): the new root's key, a new object "
            "(pkcs11:token=...;object=...; made there unless it exists; the same PIN).",
            show_default=False,
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="The new root's lifetime.")] = 3650,
    home: HomeOpt = None,
    passphrase_file: RootPassphraseOpt = None,
) -> None:
    """A new root (new key, the old root's name) certified by the old root and certifying it
    back (cross-certificates both ways, RFC 4210 4.4). /cacerts serves them; devices adopt the
    new root at their next renewal through the old-signed-new certificate; brokers trust both.
    Then `fleetpki ca rollover` makes an issuing CA under the new root."""
    from enroll_server.home.config import load_config
    from enroll_server.home.layout import HomeError
    from enroll_server.home.root import load_root_issuer
    from enroll_server.home.root_update import rollover_root
    from enroll_server.registry import RegistryError

    layout = initialized_layout(home)
    now = datetime.now(UTC)
    try:
        with changing_ca(layout, now):
            config = load_config(layout.config)
            old = load_root_issuer(layout, root_dir, passphrase_file)
            done = rollover_root(
                layout,
                config,
                old,
                now,
                days=days,
                new_root_dir=new_root,
                root_passphrase_file=passphrase_file,
                new_root_key=None
                if new_root_key is None
                else partial(new_token_key, layout, config, new_root_key),
            )
    except HomeError as exc:
        fail(str(exc))
    except RegistryError as exc:
        fail(str(exc), ExitCode.FAILED)
    except OSError as exc:
        fail(f"cannot write the home: {exc.strerror or exc}", ExitCode.FAILED)
    new = done.update.new
    console.print(
        f"[green]new root[/green] {new.subject.rfc4514_string()} until {new.not_valid_after_utc}"
    )
    console.print(f"  root CA      {layout.root_cert}  (new bundles carry it as ca.pem)")
    console.print(f"  cross-certs  {layout.root_update}  (served in /cacerts)")
    if done.new_root_dir is not None:
        console.print(f"  new root key {done.new_root_dir}/root.key (keep the old DIR too)")
    console.print(
        "  devices adopt it at their next renewal; next: fleetpki ca rollover (an issuing CA "
        "under the new root)"
    )


def new_token_key(
    layout: HomeLayout, config: ServerConfig, uri: str, option: str = "--new-root-key"
) -> Pkcs11Signer:
    """A new CA key in its token, `option URI` (`rollover-root --new-root-key`, `rollover
    --ca-key`): made there unless it exists. HomeError if unusable."""
    from enroll_server.home.layout import TOKEN_CURVES, HomeError, token_key_signer
    from enroll_server.pki.signer import SignerError

    if config.key_type not in TOKEN_CURVES:
        raise HomeError(layout.root, f"{option} makes an EC key: [ca] key_type is not EC")
    try:
        return token_key_signer(
            layout, config, uri, create=True, curve=TOKEN_CURVES[config.key_type]
        )
    except SignerError as exc:
        raise HomeError(layout.root, f"{option}: {exc}") from None
