"""The CA state a home shares with the other nodes of its registry: a CA change recorded there
(`ca_change`), another node's change adopted here (`follow`, `catch_up`).

A home's CA is its files under H/ca/ (home/issuers.py, home/root_update.py). On a shared
(PostgreSQL) registry each CA change (`ca rollover`, `ca revoke-issuing`, a retirement, `ca
rollover-root`) is recorded as one numbered generation of those files (CaState), and every
node adopts a newer generation into its own home, where its running serve picks it up as it
picks up a change made by the CLI there (wiring/issuers.py). A SQLite registry has one home:
nothing here runs for it.

What a generation holds (read_state), and why:
- issuing.pem and the previous issuers (issuers/<id>.pem), the retired (retired/) and revoked
  (revoked/) ones, first-issuer: which CAs sign, are trusted, have their CRL and OCSP served;
- their keys as the home stores them: issuing.key and issuers/<id>.key encrypted under the CA
  passphrase (every node has its copy since `node add`; a clear key is refused), or the PKCS#11
  URI of a key in a token ([ca] key, issuers/<id>.uri: the node must reach the same token);
- root.pem, root-update.pem (a root rollover's cross-certificates), root.key (encrypted, a
  root in the home) or [ca] root_key's URI, root.crl (it lists a revoked issuing CA),
  intermediates.pem (an external root's).
Not in it: the passphrase, tls/ (each node's own server certificate, renewed here under the
new issuing CA), chain.pem (written from the others by write_chain, its one writer).

Files: H/ca/generation, the generation the home is at (absent: 0); H/ca/generation.next, a
change under way. A process killed between changing the files and recording them leaves
generation.next: the next `ca_change` or serve's `follow` on that home records the files then.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from enroll_server.home.config import load_config, with_root_key
from enroll_server.home.issuers import (
    REVOKED,
    IssuerFiles,
    current_key,
    issuer_token_key,
    issuer_urls,
    previous_key,
    write_chain,
)
from enroll_server.home.layout import (
    HomeError,
    HomeLayout,
    home_passphrase,
    renew_server_certificate,
)
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import load_private_key_pem
from fleetpki.atomic_file import PUBLIC_MODE, make_private_dir, write_atomic

if TYPE_CHECKING:
    from enroll_server.registry import Registry

log = logging.getLogger("fleetpki.ca_state")

GENERATION = "generation"
PENDING = "generation.next"
ISSUING_PEM, ISSUING_KEY, ROOT_PEM, ROOT_KEY, ROOT_CRL = (
    "issuing.pem",
    "issuing.key",
    "root.pem",
    "root.key",
    "root.crl",
)
# Written before the current issuer and the root change (each ignored until they do), in
# this order; the folders' files first.
_ADDED = ("first-issuer", "intermediates.pem", "root-update.pem", ROOT_CRL)
_FOLDERS = ("issuers", "retired", REVOKED)
_ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


@dataclass(frozen=True, slots=True)
class CaState:
    """A home's shared CA files (paths relative to H/ca/) and its keys' token URIs."""

    files: Mapping[str, bytes]
    ca_key: str = ""  # [ca] key: the current issuing key in a token
    root_key: str = ""  # [ca] root_key

    def encode(self) -> str:
        files = {name: base64.b64encode(data).decode() for name, data in sorted(self.files.items())}
        return json.dumps({"files": files, "ca_key": self.ca_key, "root_key": self.root_key})

    @classmethod
    def decode(cls, text: str) -> CaState:
        raw = json.loads(text)
        files = {str(k): base64.b64decode(v) for k, v in raw["files"].items()}
        for name in files:
            if name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"CA state names a file outside H/ca/: {name!r}")
        return cls(files, str(raw.get("ca_key", "")), str(raw.get("root_key", "")))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def home_generation(layout: HomeLayout) -> int:
    """The registry's CA state generation this home's files are at; 0 before any."""
    return _read_int(layout.ca_dir / GENERATION) or 0


def read_state(layout: HomeLayout) -> CaState:
    """The home's CA files as a CaState. HomeError if a key file is not encrypted: a clear key
    never goes into the registry."""
    config = load_config(layout.config)
    ca = layout.ca_dir
    names = [ISSUING_PEM, ROOT_PEM, ROOT_KEY, *_ADDED]
    if not config.ca_key:
        names.append(ISSUING_KEY)
    files = {name: (ca / name).read_bytes() for name in names if (ca / name).is_file()}
    for folder in _FOLDERS:
        if (ca / folder).is_dir():
            for path in sorted((ca / folder).iterdir()):
                if path.is_file():
                    files[f"{folder}/{path.name}"] = path.read_bytes()
    for name, data in files.items():
        if name.endswith(".key") and not data.lstrip().startswith(_ENCRYPTED):
            raise HomeError(
                layout.root, f"ca/{name} is not encrypted: it is not recorded in the registry"
            )
    pending = IssuerFiles(layout).next_key  # a token rollover cut short: its new key
    ca_key = pending.read_text().strip() if pending.exists() else config.ca_key
    return CaState(files, ca_key or "", config.root_key or "")


def _crl_number(data: bytes | None) -> int:
    if not data:
        return -1
    try:
        crl = x509.load_der_x509_crl(data)
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (ValueError, x509.ExtensionNotFound):
        return -1


def _check_keys(layout: HomeLayout, state: CaState, current: x509.Certificate) -> None:
    """Every live issuing CA of `state` has its key here (decrypted with this home's
    passphrase, or opened in this node's token), checked before anything changes. HomeError
    naming what is missing."""
    config = load_config(layout.config)
    if state.ca_key:
        issuer_token_key(layout, config, state.ca_key, current).close_session()
    else:
        data = state.files.get(ISSUING_KEY)
        if data is None:
            raise HomeError(layout.root, "the CA state carries no issuing CA key")
        what = f"the new issuing CA key {key_id(current)}"
        key = load_private_key_pem(data, home_passphrase(layout), what)
        if key.public_key() != current.public_key():
            raise HomeError(layout.root, f"{what} does not match its certificate")
    for name, data in state.files.items():
        if name.startswith("issuers/") and name.endswith(".pem"):
            cert = x509.load_pem_x509_certificate(data)
            if key_id(cert) != key_id(current):
                previous_key(layout, config, cert)  # the files are in place (adopt, step 1)


def adopt(layout: HomeLayout, state: CaState, now: datetime) -> bool:
    """Write `state` into the home, in an order a crash anywhere leaves working (the same as
    roll_over's): new issuers' files first; the current issuer's key (or its token URI in
    issuing.next), then issuing.pem; the root; chain.pem; then the files of issuers no longer
    live go. The TLS server certificate is renewed under the current issuing CA when it or the
    roots changed (server.pem carries a root rollover's cross-certificate). Returns whether
    the current issuer changed. HomeError, with the current issuer and root untouched, when a
    key is not to be had here."""
    ca = layout.ca_dir
    try:
        current = x509.load_pem_x509_certificate(state.files[ISSUING_PEM])
    except (KeyError, ValueError) as exc:
        raise HomeError(layout.root, f"the CA state's issuing CA is unreadable: {exc}") from None

    def differs(name: str) -> bool:
        path = ca / name
        return name in state.files and (
            not path.is_file() or path.read_bytes() != state.files[name]
        )

    def put(name: str) -> None:
        path = ca / name
        make_private_dir(path.parent)
        write_atomic(path, state.files[name], 0o600 if name.endswith(".key") else PUBLIC_MODE)

    added = sorted(n for n in state.files if "/" in n) + [n for n in _ADDED if n != ROOT_CRL]
    roots_changed = differs(ROOT_PEM) or differs("root-update.pem")
    for name in added:
        if differs(name):
            put(name)
    # A root CRL only replaces an older one (its number, RFC 5280 5.2.3, never goes back).
    if differs(ROOT_CRL) and _crl_number(state.files[ROOT_CRL]) >= _crl_number(
        (ca / ROOT_CRL).read_bytes() if (ca / ROOT_CRL).is_file() else None
    ):
        put(ROOT_CRL)
    try:
        _check_keys(layout, state, current)
    except (PkiError, ValueError) as exc:
        raise HomeError(layout.root, str(exc)) from None
    issuer_changed = differs(ISSUING_PEM)
    if issuer_changed:
        if state.ca_key:
            # The token's new key: current_key below names it in fleetpki.toml (roll_over's
            # issuing.next staging).
            write_atomic(IssuerFiles(layout).next_key, f"{state.ca_key}\n".encode(), PUBLIC_MODE)
        elif differs(ISSUING_KEY):
            put(ISSUING_KEY)
        put(ISSUING_PEM)
    if differs(ROOT_KEY):
        put(ROOT_KEY)
    if differs(ROOT_PEM):
        put(ROOT_PEM)
    config = load_config(layout.config)
    if state.root_key and state.root_key != config.root_key:
        text = with_root_key(layout.config.read_text(), state.root_key)
        write_atomic(layout.config, text.encode(), 0o600)
        config = load_config(layout.config)
    key = current_key(layout, current)
    live = [
        x509.load_pem_x509_certificate(data)
        for name, data in state.files.items()
        if name.startswith("issuers/") and name.endswith(".pem")
    ]
    previous = sorted(
        (c for c in live if key_id(c) != key_id(current)), key=lambda c: c.not_valid_before_utc
    )
    write_chain(layout, current, previous)
    files = IssuerFiles(layout)
    if files.previous_dir.is_dir():
        for path in files.previous_dir.iterdir():
            # Retired or revoked at the node that recorded it (which destroyed a token key).
            if f"issuers/{path.name}" not in state.files:
                path.unlink(missing_ok=True)
    if issuer_changed or roots_changed:
        issuer = Issuer(current, key, issuer_urls(layout, config, current))
        renew_server_certificate(layout, issuer, config, now)
    return issuer_changed


def _set_generation(layout: HomeLayout, generation: int) -> None:
    write_atomic(layout.ca_dir / GENERATION, f"{generation}\n".encode(), PUBLIC_MODE)


def catch_up(layout: HomeLayout, registry: Registry, now: datetime) -> int | None:
    """Under the registry's CA change lock: record a change this home made and did not record
    (generation.next), then adopt a newer generation another node recorded. Returns the
    generation adopted, None if none was."""
    pending_path = layout.ca_dir / PENDING
    pending = _read_int(pending_path)
    latest = registry.latest_ca_state()
    if pending_path.exists():
        mine = read_state(layout)
        if latest is not None and CaState.decode(latest.state) == mine:
            _set_generation(layout, latest.generation)
        elif pending is not None and (latest is None or latest.generation < pending):
            registry.record_ca_state(pending, mine.encode(), now)
            _set_generation(layout, pending)
            latest = None
        else:
            log.error(
                "this home's CA change was not recorded and generation %s was recorded since "
                "by another node: adopting it, this home's change is dropped",
                pending,
            )
        pending_path.unlink()
    if latest is None or latest.generation <= home_generation(layout):
        return None
    adopt(layout, CaState.decode(latest.state), now)
    _set_generation(layout, latest.generation)
    return latest.generation


def follow(layout: HomeLayout, registry: Registry, now: datetime) -> int | None:
    """serve's look at the registry (worker thread): catch_up when there is anything to do
    (one indexed read otherwise). Returns the generation adopted, None if none was."""
    if not registry.shared:
        return None
    pending = (layout.ca_dir / PENDING).exists()
    if not pending and registry.ca_state_generation() <= home_generation(layout):
        return None
    with registry.ca_state_lock():
        return catch_up(layout, registry, now)


@contextmanager
def ca_change(layout: HomeLayout, registry: Registry, now: datetime) -> Iterator[None]:
    """Around every change of the home's CA files on a shared registry: one change at a time
    across the nodes (the registry's CA lock); the home first catches up (a change is never
    made to an old CA state); then the home's files are recorded as the next generation.
    generation.next, written before the change, makes a kill in between converge (catch_up).
    HomeError before anything changes when the home cannot adopt the newer state."""
    if not registry.shared:
        yield
        return
    with registry.ca_state_lock():
        catch_up(layout, registry, now)
        before = read_state(layout)
        generation = max(registry.ca_state_generation(), home_generation(layout)) + 1
        pending = layout.ca_dir / PENDING
        write_atomic(pending, f"{generation}\n".encode(), PUBLIC_MODE)
        try:
            yield
        finally:
            if read_state(layout) == before:
                pending.unlink()  # refused, or nothing to do (no issuer to retire)
            catch_up(layout, registry, now)
