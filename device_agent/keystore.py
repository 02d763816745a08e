"""The keystore: the device's key, certificate chain and renewal record on disk, swapped atomically.

Layout of the state folder (0700):

    identity.json          {"generation": 3, "serial": "...", "not_before": "...",
                            "not_after": "...", "next_renewal": "..."}   <- the commit point
    gen-000003/key.pem     private key, PKCS#8 PEM, 0600
    gen-000003/cert.pem    certificate chain, leaf first, PEM
    status.json            runtime status for `fleetpki-agent status` (not part of the identity)

A new identity is written into a fresh generation folder (each file: temp file, fsync, rename,
fsync of the folder), and only then is identity.json atomically replaced to name it. A power cut
at any instant therefore leaves identity.json naming either the old complete generation or the
new complete one: never a key without its certificate, never a half-written file.

Loading checks the pair with the ssl module (the code that presents it in TLS) and reads the
validity dates from identity.json, so an enrolled agent that is only keeping its session up
never parses a certificate with cryptography: that would initialise a second OpenSSL (the one
linked into cryptography), ~0.6 MiB of RSS on a Pi for nothing. The chain is parsed on demand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509

from device_agent.errors import KeyUnreadable, StateCorrupt
from device_agent.keys import PrivateKey, load_private_key_pem, private_key_pem, same_public_key

IDENTITY_FILE = "identity.json"
STATUS_FILE = "status.json"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
_GEN_PREFIX = "gen-"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a mix.

    The temp file is created with its final mode (a key is never readable by others, not even
    for an instant), fsynced, renamed over the target and the folder fsynced so the rename
    itself survives a power cut.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def check_pair(cert_path: Path, key_path: Path) -> None:
    """Refuse a key that does not parse or does not match the certificate.

    Done with the ssl module, the very code that will present them in TLS: a pair it accepts
    here is a pair that works, and the idle agent never has to load the key into cryptography
    (which would initialise a second OpenSSL's decoders, about 1 MiB on a Pi).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An explicit empty password: never fall into OpenSSL's interactive prompt.
        ctx.load_cert_chain(str(cert_path), str(key_path), password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StateCorrupt(
                cert_path, f"the certificate does not match the key {key_path}"
            ) from exc
        # Which file is bad? The certificate alone is easy to test.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert_path))
        except ssl.SSLError:
            raise StateCorrupt(cert_path, f"not a valid certificate ({exc.reason})") from exc
        raise KeyUnreadable(key_path, f"not a usable private key ({exc.reason or exc})") from exc


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gen_name(generation: int) -> str:
    return f"{_GEN_PREFIX}{generation:06d}"


def _iso(value: datetime) -> str:
    return value.isoformat()


@dataclass(frozen=True)
class Identity:
    """The device's current certificate (leaf first chain) and key, by path, with the dates
    that drive the agent. Neither the key nor the chain is held in memory until asked for:
    TLS reads them from the files, and renewal makes a new key anyway.
    """

    generation: int
    serial_hex: str
    not_before: datetime
    not_after: datetime
    next_renewal: datetime
    key_path: Path
    cert_path: Path

    @cached_property
    def chain(self) -> tuple[x509.Certificate, ...]:
        try:
            chain = tuple(x509.load_pem_x509_certificates(self.cert_path.read_bytes()))
        except OSError as exc:
            raise StateCorrupt(self.cert_path, f"cannot read the certificate: {exc}") from exc
        except (ValueError, x509.InvalidVersion) as exc:
            raise StateCorrupt(self.cert_path, f"not a valid PEM certificate chain: {exc}") from exc
        if not chain:
            raise StateCorrupt(self.cert_path, "holds no certificate")
        return chain

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    def load_key(self) -> PrivateKey:
        try:
            return load_private_key_pem(self.key_path.read_bytes())
        except OSError as exc:
            raise KeyUnreadable(self.key_path, f"cannot read the private key: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise KeyUnreadable(self.key_path, f"not a usable private key: {exc}") from exc


class Keystore:
    """The only code that touches key and certificate files."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)

    @property
    def identity_file(self) -> Path:
        return self.dir / IDENTITY_FILE

    @property
    def status_file(self) -> Path:
        return self.dir / STATUS_FILE

    def ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing folder.
        os.chmod(self.dir, 0o700)

    def _record(self) -> dict[str, Any] | None:
        try:
            raw = self.identity_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateCorrupt(self.identity_file, f"cannot read: {exc}") from exc
        try:
            record = json.loads(raw)
            int(record["generation"])
            str(record["serial"])
            for field in ("not_before", "not_after", "next_renewal"):
                datetime.fromisoformat(record[field])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateCorrupt(self.identity_file, f"not a valid identity record: {exc}") from exc
        if not isinstance(record, dict):
            raise StateCorrupt(self.identity_file, "not a JSON object")
        return record

    def load(self) -> Identity | None:
        """The committed identity, or None if the device has never been enrolled.

        Raises KeyUnreadable or StateCorrupt (naming the file) if what is on disk is unusable.
        """
        record = self._record()
        if record is None:
            return None
        generation = int(record["generation"])
        folder = self.dir / _gen_name(generation)
        key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
        for path, error in ((key_path, KeyUnreadable), (cert_path, StateCorrupt)):
            try:
                head = path.read_bytes()[:4096]
            except OSError as exc:
                raise error(path, f"cannot read: {exc.strerror}") from exc
            if b"-----BEGIN" not in head:
                raise error(path, "not a PEM file")
        check_pair(cert_path, key_path)
        return Identity(
            generation=generation,
            serial_hex=str(record["serial"]),
            not_before=datetime.fromisoformat(record["not_before"]),
            not_after=datetime.fromisoformat(record["not_after"]),
            next_renewal=datetime.fromisoformat(record["next_renewal"]),
            key_path=key_path,
            cert_path=cert_path,
        )

    def _generations(self) -> list[int]:
        found = []
        if self.dir.is_dir():
            for child in self.dir.iterdir():
                suffix = child.name.removeprefix(_GEN_PREFIX)
                if child.name.startswith(_GEN_PREFIX) and suffix.isdigit():
                    found.append(int(suffix))
        return sorted(found)

    def sweep(self) -> None:
        """Delete generation folders other than the committed one (debris of a crash or of
        the previous identity); destroys the old keys."""
        record = self._record()
        current = int(record["generation"]) if record else None
        for generation in self._generations():
            if generation != current:
                shutil.rmtree(self.dir / _gen_name(generation), ignore_errors=True)
        # Temp files of writes interrupted before their rename.
        for tmp in self.dir.glob(".*.tmp") if self.dir.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def store(
        self, key: PrivateKey, chain: list[x509.Certificate], next_renewal: datetime
    ) -> Identity:
        """Write a new generation and make it current (the atomic swap); then drop the old one."""
        if not chain or not same_public_key(chain[0].public_key(), key.public_key()):
            raise ValueError("the leaf certificate does not match the key")
        self.ensure_dir()
        generation = max(self._generations(), default=0) + 1
        folder = self.dir / _gen_name(generation)
        folder.mkdir(mode=0o700)
        key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
        write_atomic(key_path, private_key_pem(key), 0o600)
        from cryptography.hazmat.primitives.serialization import Encoding

        pem = b"".join(c.public_bytes(Encoding.PEM) for c in chain)
        write_atomic(cert_path, pem, 0o644)
        record = {
            "generation": generation,
            "serial": format(chain[0].serial_number, "x"),
            "not_before": _iso(chain[0].not_valid_before_utc),
            "not_after": _iso(chain[0].not_valid_after_utc),
            "next_renewal": _iso(next_renewal),
        }
        # The commit point: before this rename the old identity is current, after it the new.
        write_atomic(self.identity_file, json.dumps(record, indent=2).encode() + b"\n", 0o600)
        self.sweep()
        identity = Identity(
            generation=generation,
            serial_hex=format(chain[0].serial_number, "x"),
            not_before=chain[0].not_valid_before_utc,
            not_after=chain[0].not_valid_after_utc,
            next_renewal=next_renewal,
            key_path=key_path,
            cert_path=cert_path,
        )
        identity.__dict__["chain"] = tuple(chain)  # already parsed: prime the cache
        return identity

    def read_status(self) -> dict[str, Any]:
        """The last runtime status written by a running agent ({} if none or unreadable)."""
        try:
            value = json.loads(self.status_file.read_bytes())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def write_status(self, status: dict[str, Any]) -> None:
        """Persist runtime status; written only on state changes, to spare SD cards."""
        self.ensure_dir()
        write_atomic(self.status_file, json.dumps(status, indent=2).encode() + b"\n", 0o644)
