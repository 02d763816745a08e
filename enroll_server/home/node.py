"""A second (third, ...) node's home, prepared from an existing one: `fleetpki node add`.

Every node of a fleet is a `fleetpki serve` with the same CA and the same shared registry
(PostgreSQL) and a TLS server certificate of its own, for its own host names. Nodes share no
memory: any request may go to any of them. What a node's home holds, and why:

- `ca/root.pem`, `ca/chain.pem`, `ca/issuing.pem`: the trust anchor and chain it serves
  (`/cacerts`, bundles) and checks client certificates against.
- `ca/issuing.key` (encrypted) and `ca/passphrase`: it issues and renews device certificates
  and signs CRLs and OCSP responses (or the `[ca] key` reference to the token, for a key in
  an HSM, and its `pkcs11_pin_file`: the node must reach the same token).
- `ca/root.key` (encrypted) and `ca/root.crl`: `serve` re-signs the root CRL it serves at
  `/root.crl` when it falls due (an offline root: no key here, the file is served as the
  last ceremony signed it; an external root: neither, plus `ca/intermediates.pem`).
- `tls/server.pem`, `tls/server.key`: NEW, for `--hostname`, signed by the issuing CA.
- `ca/generation`: the registry's CA state generation the copied files are at; the node then
  adopts every CA change any node records (home/ca_state.py).
- `fleetpki.toml`: the original's, with this node's host names; the registry URL and its
  `registry_password_file` (copied) point at the same PostgreSQL.

Not copied: `admin.token` (operators and their tokens live in the registry, hashed) and a
SQLite `registry.db` (a node only makes sense on a shared registry: `add_node` refuses one).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from enroll_server.home.ca_state import GENERATION
from enroll_server.home.config import render_config
from enroll_server.home.issuers import IssuerFiles
from enroll_server.home.layout import (
    HomeError,
    HomeLayout,
    load_home,
    renew_server_certificate,
)
from enroll_server.registry.location import PostgresLocation
from fleetpki.atomic_file import make_private_dir, write_atomic


@dataclass(frozen=True, slots=True)
class NodeHome:
    layout: HomeLayout
    server_cert: x509.Certificate
    copied: tuple[str, ...]


def add_node(
    source: Path, out: Path, hostnames: tuple[str, ...], now: datetime, public_host: str = ""
) -> NodeHome:
    """Write a node's home into `out` (absent or empty) from the home `source`.

    HomeError, with nothing written, when `source` is not initialized, its registry is not
    shared, `out` is not empty, or no host name is given.
    """
    if not hostnames:
        raise HomeError(out, "a node needs at least one --hostname (the name devices reach it by)")
    loaded = load_home(source)
    if not isinstance(loaded.registry, PostgresLocation):
        raise HomeError(
            source,
            "its registry is a SQLite file, which only one machine can use: a second node needs "
            "a shared PostgreSQL registry (`fleetpki registry copy --from sqlite:///... --to "
            'postgresql://...`, then registry = "postgresql://..." in fleetpki.toml)',
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HomeError(out, "exists and is not empty: a node's home is written only afresh")
    mine, theirs = HomeLayout(out), loaded.layout
    config = dataclasses.replace(
        loaded.config, hostnames=hostnames, public_host=public_host or hostnames[0]
    )
    wanted = [
        theirs.root_cert,
        theirs.chain,
        theirs.issuing_cert,
        theirs.root_key,
        theirs.root_crl,
        theirs.intermediates,
        theirs.root_update,  # a root rollover's cross-certificates: /cacerts, server.pem
        theirs.passphrase_file,
    ]
    if not config.ca_key:
        wanted.append(theirs.issuing_key)
    # After an issuing CA rollover: the previous live issuers (their CRLs and OCSP), which
    # issuer owns /crl, and the revoked ones (home.issuers).
    issuers = IssuerFiles(theirs)
    wanted.append(issuers.first_issuer)
    # The registry's CA state generation these files are at: the node adopts only newer ones.
    wanted.append(theirs.ca_dir / GENERATION)
    for folder in (issuers.previous_dir, issuers.revoked_dir):
        wanted += sorted(folder.glob("*")) if folder.is_dir() else []
    for extra in (config.registry_password_file, config.pkcs11_pin_file):
        # A path outside the home (init writes the PIN file's absolute path) stays as it is:
        # the node's operator puts that file in the same place on the node.
        if extra and not Path(extra).is_absolute():
            wanted.append(theirs.root / extra)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        make_private_dir(staging)
        make_private_dir(staging / "ca")
        make_private_dir(staging / "tls")
        copied = []
        for path in wanted:
            if not path.exists():
                continue
            relative = path.relative_to(theirs.root)
            target = staging / relative
            make_private_dir(target.parent)
            write_atomic(target, path.read_bytes(), path.stat().st_mode & 0o777)
            copied.append(str(relative))
        staged = HomeLayout(staging)
        cert = renew_server_certificate(staged, loaded.issuer, config, now)
        write_atomic(staged.config, render_config(config).encode(), 0o600)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return NodeHome(mine, cert, tuple(copied))
