"""Who signs for a CA: a key in memory (a file, decrypted) or a key in a PKCS#11 token.

Every signing path (the certificate template's TBS, cryptography's builders for CA, server and
OCSP signer certificates, CRLs, OCSP responses) goes through a `Signer`. cryptography's
builders only sign with key objects of their own, so for a token the builder signs with a
stand-in key of the same algorithm (the TBS does not depend on the signing key, only on its
algorithm: RFC 5280 4.1.2.3), and the signature is then replaced by the token's over the very
same to-be-signed bytes (`tbs_certificate_bytes`, `tbs_certlist_bytes`,
`tbs_response_bytes`). A token's signature is verified with the CA's public key before the
signed object is handed back (`Pkcs11Signer.sign`), so a faulty token never publishes a
certificate, CRL or OCSP response that does not verify.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import ocsp

from enroll_server.pki import der
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import (
    PrivateKey,
    PublicKey,
    signature_hash,
    subject_public_key_bits,
)

if TYPE_CHECKING:
    import pkcs11

SignatureHash = hashes.SHA256 | hashes.SHA384 | None

# Where Debian's softhsm2 installs its module; `[ca] pkcs11_module` or FLEETPKI_PKCS11_MODULE
# name another.
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "FLEETPKI_PKCS11_PIN"
MODULE_ENV = "FLEETPKI_PKCS11_MODULE"


class SignerError(PkiError):
    """Base of the errors raised while signing with a CA key."""


class BadKeyUri(SignerError):
    """A `pkcs11:` URI that is not RFC 7512 or asks for what we do not support."""

    def __init__(self, uri: str, why: str) -> None:
        super().__init__(f"invalid PKCS#11 URI {uri!r}: {why}")
        self.uri = uri
        self.why = why


class SignerUnavailable(SignerError):
    """The token cannot sign now (removed, session lost, wrong PIN): retry later, 503.

    `why` names the token and the PKCS#11 error, never the PIN.
    """

    def __init__(self, why: str) -> None:
        super().__init__(f"CA key unavailable: {why}")
        self.why = why


class KeyNotFound(SignerUnavailable):
    """No private key (or several) in the token matches the URI."""


class BadSignature(SignerError):
    """A signature from the token that does not verify with the CA's public key."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the token's signature over a {what} does not verify with the CA key")
        self.what = what


@runtime_checkable
class Signer(Protocol):
    """A CA signing key: its public half and signatures as they go in a BIT STRING."""

    def public_key(self) -> PublicKey: ...

    @property
    def hash_algorithm(self) -> SignatureHash: ...

    def sign(self, data: bytes) -> bytes:
        """The signature value over `data`: DER ECDSA-Sig-Value (RFC 3279 2.2.3), PKCS#1 v1.5
        (RFC 8017 8.2) or Ed25519 (RFC 8410)."""
        ...


class FileKeySigner:
    """A key held in memory (loaded from the home's encrypted key file)."""

    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self._hash = signature_hash(key)

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    @property
    def hash_algorithm(self) -> SignatureHash:
        return self._hash

    def sign(self, data: bytes) -> bytes:
        key, algorithm = self.key, self._hash
        if isinstance(key, ec.EllipticCurvePrivateKey) and algorithm is not None:
            return key.sign(data, ec.ECDSA(algorithm))
        if isinstance(key, rsa.RSAPrivateKey) and algorithm is not None:
            return key.sign(data, padding.PKCS1v15(), algorithm)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        raise SignerError(f"no signature scheme for a {type(key).__name__}")


def as_signer(key: PrivateKey | Signer) -> Signer:
    """`key` itself if it is a Signer, else a FileKeySigner around it."""
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return FileKeySigner(key)
    if not isinstance(key, Signer):
        raise SignerError(f"no signer for a {type(key).__name__}")
    return key


def in_token(key: PrivateKey | Signer) -> bool:
    """True when `key` signs somewhere else than in this process (a PKCS#11 token)."""
    return not isinstance(as_signer(key), FileKeySigner)


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes, algorithm: Any) -> bool:
    """True if `signature` over `data` verifies with `public_key` (the schemes Signer makes)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --- builders: sign in place for a key in memory, else stand-in key + re-signed TBS ---------


@cache
def _stand_in(kind: tuple[str, int]) -> PrivateKey:
    """A throwaway key of the same algorithm, once per process: its signature is discarded."""
    name, size = kind
    if name == "ec":
        curve = ec.SECP384R1() if size >= 384 else ec.SECP256R1()
        return ec.generate_private_key(curve)
    if name == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    return ed25519.Ed25519PrivateKey.generate()


def _stand_in_for(signer: Signer) -> PrivateKey:
    pub = signer.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return _stand_in(("ec", pub.curve.key_size))
    if isinstance(pub, rsa.RSAPublicKey):
        return _stand_in(("rsa", pub.key_size))
    return _stand_in(("ed25519", 0))


def _resign(whole: bytes, tbs: bytes, signer: Signer, new_tbs: bytes | None = None) -> bytes:
    """SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature } (RFC 5280 4.1, 5.1) with the
    signer's signature over `tbs` (or over `new_tbs`, which then takes its place); the
    algorithm identifier is the builder's."""
    _, start, end = der.read(whole)
    parts = list(der.children(whole, start, end))
    if len(parts) != 3 or parts[0] != tbs:
        raise SignerError("signed object is not SEQUENCE { TBS, algorithm, signature }")
    tbs = new_tbs if new_tbs is not None else tbs
    signature = der.encode(0x03, b"\x00" + signer.sign(tbs))
    return der.encode(0x30, tbs + parts[1] + signature)


def _request_info_for(info: bytes, public_key: PublicKey) -> bytes:
    """CertificationRequestInfo (RFC 2986 4.1: SEQUENCE { version, subject, subjectPKInfo,
    attributes [0] }) with `public_key` as subjectPKInfo: a CSR builder takes the key it
    signs with as the subject's, so the stand-in's must be swapped for the signer's."""
    _, start, end = der.read(info)
    parts = list(der.children(info, start, end))
    if len(parts) != 4:
        raise SignerError("CertificationRequestInfo is not SEQUENCE { version, subject, spki, [0]}")
    parts[2] = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.encode(0x30, b"".join(parts))


@overload
def sign_x509(builder: x509.CertificateBuilder, key: PrivateKey | Signer) -> x509.Certificate: ...


@overload
def sign_x509(
    builder: x509.CertificateRevocationListBuilder, key: PrivateKey | Signer
) -> x509.CertificateRevocationList: ...


@overload
def sign_x509(
    builder: x509.CertificateSigningRequestBuilder, key: PrivateKey | Signer
) -> x509.CertificateSigningRequest: ...


def sign_x509(
    builder: x509.CertificateBuilder
    | x509.CertificateRevocationListBuilder
    | x509.CertificateSigningRequestBuilder,
    key: PrivateKey | Signer,
) -> x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest:
    """builder.sign with `key`, a key in memory or any Signer (e.g. a PKCS#11 token)."""
    signer = as_signer(key)
    if isinstance(signer, FileKeySigner):
        return builder.sign(signer.key, signer.hash_algorithm)
    draft = builder.sign(_stand_in_for(signer), signer.hash_algorithm)
    whole = draft.public_bytes(serialization.Encoding.DER)
    if isinstance(draft, x509.Certificate):
        return x509.load_der_x509_certificate(_resign(whole, draft.tbs_certificate_bytes, signer))
    if isinstance(draft, x509.CertificateSigningRequest):
        # RFC 2986 4.2: SEQUENCE { certificationRequestInfo, signatureAlgorithm, signature }.
        info = draft.tbs_certrequest_bytes
        theirs = _request_info_for(info, signer.public_key())
        return x509.load_der_x509_csr(_resign(whole, info, signer, theirs))
    return x509.load_der_x509_crl(_resign(whole, draft.tbs_certlist_bytes, signer))


def sign_ocsp(
    builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate, key: PrivateKey | Signer
) -> ocsp.OCSPResponse:
    """builder's response signed by `key` (a key in memory or any Signer) for `responder`,
    named by key hash (byKey, RFC 6960 4.2.1; the form RFC 5019 2.2.2 recommends).

    cryptography checks the responder certificate's key against the signing key, so for a
    token the draft is made with a stand-in certificate (same subject, the stand-in key) and
    its byKey hash then replaced by the responder's. OCSPResponse (RFC 6960 4.2.1) wraps
    responseBytes [0] { responseType, OCTET STRING {
    BasicOCSPResponse { tbsResponseData, signatureAlgorithm, signature, certs [0] } } }: the
    signature is replaced inside, the rest (status, type, certs) kept as the builder wrote it.
    """
    signer = as_signer(key)
    by_key = ocsp.OCSPResponderEncoding.HASH
    if isinstance(signer, FileKeySigner):
        return builder.responder_id(by_key, responder).sign(signer.key, signer.hash_algorithm)
    stand_in = _stand_in_for(signer)
    stand_in_cert = (
        x509.CertificateBuilder()
        .subject_name(responder.subject)
        .issuer_name(responder.subject)
        .public_key(stand_in.public_key())
        .serial_number(1)
        .not_valid_before(responder.not_valid_before_utc)
        .not_valid_after(responder.not_valid_after_utc)
        .sign(stand_in, signer.hash_algorithm)
    )
    draft = builder.responder_id(by_key, stand_in_cert).sign(stand_in, signer.hash_algorithm)
    whole = draft.public_bytes(serialization.Encoding.DER)
    _, start, end = der.read(whole)
    status, response_bytes = der.children(whole, start, end)
    inner = der.contents(response_bytes)  # [0] EXPLICIT
    _, start, end = der.read(inner)
    response_type, octets = der.children(inner, start, end)
    basic = der.contents(octets)
    _, start, end = der.read(basic)
    tbs, algorithm, _signature, *certs = der.children(basic, start, end)
    if tbs != draft.tbs_response_bytes:
        raise SignerError("BasicOCSPResponse does not start with its tbsResponseData")
    # ResponderID byKey [2] EXPLICIT KeyHash, the SHA-1 of the key's BIT STRING (RFC 6960 4.2.1).
    drafted, real = (
        der.encode(0xA2, der.encode(0x04, _sha1(subject_public_key_bits(k))))
        for k in (stand_in.public_key(), responder.public_key())
    )
    if tbs.count(drafted) != 1:
        raise SignerError("tbsResponseData does not name its responder by key hash once")
    tbs = tbs.replace(drafted, real)
    signature = der.encode(0x03, b"\x00" + signer.sign(tbs))
    basic = der.encode(0x30, tbs + algorithm + signature + b"".join(certs))
    inner = der.encode(0x30, response_type + der.encode(0x04, basic))
    return ocsp.load_der_ocsp_response(der.encode(0x30, status + der.encode(0xA0, inner)))


def _sha1(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA1())  # noqa: S303 (RFC 6960 4.2.1 KeyHash is SHA-1)
    digest.update(data)
    return digest.finalize()


# --- PKCS#11 --------------------------------------------------------------------------------

# RFC 7512 2.3: the path attributes; the ones we act on, and the ones we accept and ignore.
_PATH_USED = {"token", "object", "id", "type"}
_PATH_KNOWN = _PATH_USED | {
    "manufacturer",
    "model",
    "serial",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
}
_QUERY_KNOWN = {"module-path", "module-name", "pin-source", "pin-value"}


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that name one private key in one token."""

    token: str
    object: str | None
    id: bytes | None
    module_path: str | None = None

    def __str__(self) -> str:
        quote = urllib.parse.quote
        path = [f"token={quote(self.token, safe='')}"]
        if self.object is not None:
            path.append(f"object={quote(self.object, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        path.append("type=private")
        return "pkcs11:" + ";".join(path)


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse `pkcs11:token=...;object=...` (RFC 7512), strictly.

    A token label is required, and an object label or id; `type`, if given, must be
    `private`. A PIN in the URI (`pin-value`) is refused: it would sit on the command line and
    in fleetpki.toml. `pin-source` is refused too: the PIN comes from --pin-file or
    FLEETPKI_PKCS11_PIN.
    """
    if not uri.startswith("pkcs11:"):
        raise BadKeyUri(uri, "must start with 'pkcs11:' (RFC 7512)")
    rest = uri[len("pkcs11:") :]
    path, _, query = rest.partition("?")
    attrs: dict[str, str] = {}
    raw: dict[str, str] = {}
    for part in path.split(";") if path else []:
        name, eq, value = part.partition("=")
        if not eq or not name:
            raise BadKeyUri(uri, f"path attribute {part!r} is not name=value")
        if name not in _PATH_KNOWN:
            raise BadKeyUri(uri, f"unknown path attribute {name!r} (RFC 7512 2.3)")
        if name in attrs:
            raise BadKeyUri(uri, f"path attribute {name!r} given twice")
        raw[name] = value
        attrs[name] = _unquote(uri, value) if name != "id" else value
    module_path: str | None = None
    for part in query.split("&") if query else []:
        name, eq, value = part.partition("=")
        if not eq or name not in _QUERY_KNOWN:
            raise BadKeyUri(uri, f"unknown query attribute {part!r} (RFC 7512 2.3)")
        if name in ("pin-value", "pin-source"):
            raise BadKeyUri(
                uri, f"{name} is not accepted: give the PIN with --pin-file or ${PIN_ENV}"
            )
        if name == "module-path":
            module_path = _unquote(uri, value)
        else:
            raise BadKeyUri(uri, "module-name is not supported: use module-path")
    token = attrs.get("token")
    if not token:
        raise BadKeyUri(uri, "a token label is required (token=...)")
    if attrs.get("type", "private") != "private":
        raise BadKeyUri(uri, f"type={attrs['type']!r}: the CA key is a private key")
    obj = attrs.get("object")
    key_id = attrs.get("id")
    if obj is None and key_id is None:
        raise BadKeyUri(uri, "an object label or id is required (object=... or id=...)")
    id_bytes = None
    if key_id is not None:
        _check_chars(uri, raw["id"])  # an id is bytes, not UTF-8
        id_bytes = urllib.parse.unquote_to_bytes(raw["id"])
        if not id_bytes:
            raise BadKeyUri(uri, "id= is empty")
    return Pkcs11Uri(token, obj, id_bytes, module_path)


def _check_chars(uri: str, value: str) -> None:
    # RFC 7512 2.3: pk11-pchar is unreserved / pct-encoded / a few sub-delims; no raw spaces.
    if any(c in value for c in ' "<>\\^`{|}'):
        raise BadKeyUri(uri, f"{value!r} has characters that must be percent-encoded")


def _unquote(uri: str, value: str) -> str:
    _check_chars(uri, value)
    try:
        return urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise BadKeyUri(uri, f"{value!r} is not UTF-8 once percent-decoded") from None


def read_pin(pin_file: Path | None, environ: dict[str, str] | None = None) -> str:
    """The token PIN: the first line of `pin_file`, else $FLEETPKI_PKCS11_PIN."""
    env = os.environ if environ is None else environ
    if pin_file is not None:
        try:
            lines = pin_file.read_text().splitlines()
        except OSError as exc:
            raise SignerUnavailable(f"cannot read PIN file {pin_file}: {exc.strerror}") from None
        pin = lines[0] if lines else ""
    else:
        pin = env.get(PIN_ENV, "")
    if not pin:
        raise SignerUnavailable(
            f"no token PIN: give --pin-file (init), [ca] pkcs11_pin_file or ${PIN_ENV}"
        )
    return pin


def module_path(configured: str | None, uri: Pkcs11Uri | None = None) -> str:
    """The PKCS#11 module: the URI's module-path, fleetpki.toml's, $FLEETPKI_PKCS11_MODULE, or
    Debian's SoftHSM2."""
    if uri is not None and uri.module_path:
        return uri.module_path
    return configured or os.environ.get(MODULE_ENV) or DEFAULT_PKCS11_MODULE


def _pkcs11_error(exc: BaseException) -> str:
    # python-pkcs11's exceptions are named after the CKR_ code; their text is often empty.
    return type(exc).__name__ + (f" ({exc})" if str(exc) else "")


def _open_session(module: str, uri: Pkcs11Uri, pin: str) -> pkcs11.Session:
    import pkcs11

    try:
        lib = pkcs11.lib(module)
    except (OSError, RuntimeError, pkcs11.PKCS11Error) as exc:
        raise SignerUnavailable(f"cannot load PKCS#11 module {module}: {exc}") from None
    try:
        token = lib.get_token(token_label=uri.token)
    except pkcs11.NoSuchToken:
        raise SignerUnavailable(f"no token labelled {uri.token!r} in {module}") from None
    except pkcs11.PKCS11Error as exc:
        raise SignerUnavailable(f"token {uri.token!r}: {_pkcs11_error(exc)}") from None
    try:
        return token.open(user_pin=pin, rw=True)
    except pkcs11.UserAlreadyLoggedIn:
        # PKCS#11 logs an application in per token, not per session (v2.40 5.6): another
        # session of this process is logged in, and a new one shares its login.
        try:
            return token.open(rw=True)
        except pkcs11.PKCS11Error as exc:
            raise SignerUnavailable(f"token {uri.token!r}: {_pkcs11_error(exc)}") from None
    except pkcs11.PinIncorrect:
        raise SignerUnavailable(f"token {uri.token!r}: wrong PIN") from None
    except pkcs11.PKCS11Error as exc:
        raise SignerUnavailable(f"token {uri.token!r}: {_pkcs11_error(exc)}") from None


def _find(session: pkcs11.Session, uri: Pkcs11Uri, object_class: Any) -> Any:
    import pkcs11

    attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: object_class}
    if uri.object is not None:
        attrs[pkcs11.Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[pkcs11.Attribute.ID] = uri.id
    found = list(session.get_objects(attrs))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise KeyNotFound(f"{what} {object_class.name.lower()} objects match {uri}")
    return found[0]


def generate_pkcs11_key(module: str, uri: Pkcs11Uri, pin: str, curve: str = "secp256r1") -> None:
    """Create an EC key pair in the token, labelled as `uri` says, the private half sensitive
    and not extractable (PKCS#11 v2.40 4.9: CKA_SENSITIVE true, CKA_EXTRACTABLE false)."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    if uri.object is None:
        raise BadKeyUri(str(uri), "generating a key needs an object label")
    session = _open_session(module, uri, pin)
    try:
        existing = list(
            session.get_objects(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                    pkcs11.Attribute.LABEL: uri.object,
                }
            )
        )
        if existing:
            raise SignerError(f"token {uri.token!r} already holds a key labelled {uri.object!r}")
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC,
            {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
            local=True,
        )
        key_id = os.urandom(16) if uri.id is None else uri.id
        params.generate_keypair(
            store=True,
            label=uri.object,
            id=key_id,
            private_template={
                pkcs11.Attribute.SENSITIVE: True,
                pkcs11.Attribute.EXTRACTABLE: False,
                pkcs11.Attribute.PRIVATE: True,
            },
        )
    except pkcs11.PKCS11Error as exc:
        raise SignerUnavailable(f"token {uri.token!r}: {_pkcs11_error(exc)}") from None
    finally:
        session.close()


def token_signer(
    module: str, uri: Pkcs11Uri, pin: str, *, create: bool = False, curve: str = "secp256r1"
) -> Pkcs11Signer:
    """The key `uri` names; with `create`, made in the token first if it holds none."""
    try:
        return Pkcs11Signer(module, uri, pin)
    except KeyNotFound:
        if not create:
            raise
    generate_pkcs11_key(module, uri, pin, curve)
    return Pkcs11Signer(module, uri, pin)


class Pkcs11Signer:
    """A CA key in a PKCS#11 token (EC P-256/P-384 or RSA): signs in the token, never leaves it.

    One session, opened at construction (a wrong PIN or a missing token fails here, before
    anything is served), reopened on the next signature if it was lost (token removed, module
    reset): a signature that cannot be made raises SignerUnavailable, which devices see as
    503 + Retry-After, and nothing is recorded for it.
    """

    def __init__(self, module: str, uri: Pkcs11Uri, pin: str) -> None:
        self.module = module
        self.uri = uri
        self._pin = pin
        self._lock = threading.Lock()
        self._session: Any = None
        self._private: Any = None
        self._connect()
        self._public = self._read_public()
        if isinstance(self._public, ec.EllipticCurvePublicKey):
            self._hash: SignatureHash = (
                hashes.SHA384() if self._public.curve.key_size >= 384 else hashes.SHA256()
            )
        elif isinstance(self._public, rsa.RSAPublicKey):
            self._hash = hashes.SHA256()
        else:
            raise SignerError(f"{uri}: unsupported key type {type(self._public).__name__}")

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.uri}, module={self.module!r})"

    def _connect(self) -> None:
        import pkcs11

        session = _open_session(self.module, self.uri, self._pin)
        try:
            self._private = _find(session, self.uri, pkcs11.ObjectClass.PRIVATE_KEY)
        except BaseException:
            session.close()
            raise
        self._session = session

    def _read_public(self) -> PublicKey:
        import pkcs11
        from pkcs11.util.ec import encode_ec_public_key
        from pkcs11.util.rsa import encode_rsa_public_key

        public = _find(self._session, self.uri, pkcs11.ObjectClass.PUBLIC_KEY)
        if public.key_type == pkcs11.KeyType.EC:
            spki = encode_ec_public_key(public)
        elif public.key_type == pkcs11.KeyType.RSA:
            spki = serialization.load_der_public_key(encode_rsa_public_key(public)).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            raise SignerError(f"{self.uri}: unsupported key type {public.key_type}")
        key = serialization.load_der_public_key(spki)
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise SignerError(f"{self.uri}: unsupported key type {type(key).__name__}")
        return key

    def public_key(self) -> PublicKey:
        return self._public

    @property
    def hash_algorithm(self) -> SignatureHash:
        return self._hash

    def _raw_sign(self, data: bytes) -> bytes:
        import pkcs11

        if isinstance(self._public, ec.EllipticCurvePublicKey):
            digest = hashes.Hash(self._hash or hashes.SHA256())
            digest.update(data)
            rs = self._private.sign(digest.finalize(), mechanism=pkcs11.Mechanism.ECDSA)
            # PKCS#11 returns r || s, each the size of the order; X.509 wants
            # Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } (RFC 3279 2.2.3).
            half = len(rs) // 2
            r, s = int.from_bytes(rs[:half], "big"), int.from_bytes(rs[half:], "big")
            return encode_dss_signature(r, s)
        return bytes(self._private.sign(data, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS))

    def sign(self, data: bytes) -> bytes:
        import pkcs11

        with self._lock:
            try:
                if self._session is None:
                    self._connect()
                signature = self._raw_sign(data)
            except pkcs11.PKCS11Error:
                # The session may be gone (module reset, token reinserted): one new session,
                # one more try; if that fails too, the token is away.
                self.close_session()
                try:
                    self._connect()
                    signature = self._raw_sign(data)
                except pkcs11.PKCS11Error as exc:
                    self.close_session()
                    why = f"token {self.uri.token!r}: {_pkcs11_error(exc)}"
                    raise SignerUnavailable(why) from None
        if not verify_signature(self._public, signature, data, self._hash):
            raise BadSignature("to-be-signed structure")
        return signature

    def destroy(self) -> None:
        """Destroy the key's private and public objects in the token (PKCS#11 v2.40
        C_DestroyObject): a retired or revoked CA key can sign nothing more. SignerError if
        the token refuses."""
        import pkcs11

        with self._lock:
            try:
                if self._session is None:
                    self._connect()
                for kind in (pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.ObjectClass.PUBLIC_KEY):
                    _find(self._session, self.uri, kind).destroy()
            except pkcs11.PKCS11Error as exc:
                raise SignerUnavailable(f"token {self.uri.token!r}: {_pkcs11_error(exc)}") from None
            finally:
                self.close_session()

    def close_session(self) -> None:
        """Drop the session (the next signature opens a new one); errors closing are moot."""
        session, self._session, self._private = self._session, None, None
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: S110 (a lost token cannot be closed cleanly)
                pass
