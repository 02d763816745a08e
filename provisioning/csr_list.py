"""Factory CSR lists: PEM CSRs made by the factory key store, one per device (IDevID mode)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from enroll_server.pki.errors import UnsupportedKey
from enroll_server.pki.keys import PublicKey, key_type_of
from fleetpki.identity import DeviceId, InvalidIdentifier
from provisioning.errors import CsrListError
from provisioning.ids import MAX_BATCH

_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----"
_END = b"-----END CERTIFICATE REQUEST-----"
_MAX_PEM = 64 * 1024


def _blocks(path: Path) -> Iterator[bytes]:
    """Each PEM CSR block of the file, read line by line (the file may hold 100,000)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise CsrListError(path, 0, f"cannot read: {exc.strerror or exc}") from exc
    with fh:
        block: list[bytes] | None = None
        size = 0
        for line in fh:
            stripped = line.strip()
            if stripped == _BEGIN:
                block, size = [stripped], 0
            elif block is not None:
                block.append(stripped)
                size += len(stripped)
                if size > _MAX_PEM:
                    raise CsrListError(path, 0, f"a PEM block is larger than {_MAX_PEM} bytes")
                if stripped == _END:
                    yield b"\n".join(block) + b"\n"
                    block = None


def _parse(path: Path, index: int, pem: bytes) -> tuple[DeviceId, PublicKey]:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CsrListError(path, index, f"not a PKCS#10 request: {exc}") from exc
    # RFC 2986 4.2: the self-signature proves the key store holds the private key.
    if not csr.is_signature_valid:
        raise CsrListError(path, index, "signature is invalid (no proof of possession)")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CsrListError(path, index, f"subject must hold exactly one CN, found {len(cns)}")
    raw = cns[0].value
    value = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    try:
        device_id = DeviceId.parse(value)
    except InvalidIdentifier as exc:
        raise CsrListError(path, index, f"CN {value!r}: {exc.why}") from exc
    public_key = csr.public_key()
    try:
        key_type_of(public_key)
    except UnsupportedKey as exc:
        raise CsrListError(path, index, f"key cannot be used: {exc.reason}") from exc
    if not isinstance(public_key, PublicKey):
        raise CsrListError(path, index, f"key type {type(public_key).__name__} is not accepted")
    return device_id, public_key


@dataclass(frozen=True, slots=True)
class CsrList:
    """A CSR list that scan_csr_list has fully validated."""

    path: Path
    count: int

    def entries(self) -> Iterator[tuple[DeviceId, PublicKey]]:
        for index, pem in enumerate(_blocks(self.path), 1):
            yield _parse(self.path, index, pem)

    def index_of(self, device_id: DeviceId) -> int | None:
        for index, (found, _) in enumerate(self.entries(), 1):
            if found == device_id:
                return index
        return None


def scan_csr_list(path: Path) -> CsrList:
    """Validate every CSR (decoding, signature, CN = a valid device id, key type, duplicates)
    before anything is created."""
    path = Path(path)
    seen: dict[str, int] = {}
    for index, pem in enumerate(_blocks(path), 1):
        device_id, _ = _parse(path, index, pem)
        if device_id.value in seen:
            raise CsrListError(
                path, index, f"device {device_id} already has CSR #{seen[device_id.value]}"
            )
        seen[device_id.value] = index
        if len(seen) > MAX_BATCH:
            raise CsrListError(path, index, f"more than {MAX_BATCH} CSRs")
    if not seen:
        raise CsrListError(path, 0, "no PEM certificate request in the file")
    return CsrList(path, len(seen))
