"""RFC 7512 PKCS#11 URIs naming the CA key: parsed strictly, never carrying a PIN."""

from __future__ import annotations

from pathlib import Path

import pytest

from enroll_server.pki.signer import (
    BadKeyUri,
    Pkcs11Uri,
    SignerUnavailable,
    module_path,
    parse_pkcs11_uri,
    read_pin,
)


def test_token_object_id_and_percent_encoding() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=Fleet%20CA;object=issuing;type=private;id=%01%ff")
    assert uri == Pkcs11Uri("Fleet CA", "issuing", b"\x01\xff")
    assert parse_pkcs11_uri(str(uri)) == uri  # round trip through the canonical form
    with_module = parse_pkcs11_uri("pkcs11:token=t;object=k?module-path=/opt/hsm.so")
    assert with_module.module_path == "/opt/hsm.so"
    assert module_path("/etc/conf.so", with_module) == "/opt/hsm.so"
    assert module_path("/etc/conf.so", parse_pkcs11_uri("pkcs11:token=t;id=%01")) == "/etc/conf.so"
    # Attributes RFC 7512 defines but that do not select the key are accepted.
    assert parse_pkcs11_uri("pkcs11:manufacturer=SoftHSM;token=t;object=k").token == "t"


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("token=t;object=k", "must start with 'pkcs11:'"),
        ("pkcs11:object=k", "a token label is required"),
        ("pkcs11:token=t", "an object label or id is required"),
        ("pkcs11:token=t;object=k;type=cert", "the CA key is a private key"),
        ("pkcs11:token=t;label=k", "unknown path attribute 'label'"),
        ("pkcs11:token=t;token=u;object=k", "given twice"),
        ("pkcs11:token=t;object", "is not name=value"),
        ("pkcs11:token=t;object=k?pin-value=1234", "pin-value is not accepted"),
        ("pkcs11:token=t;object=k?pin-source=file:/p", "pin-source is not accepted"),
        ("pkcs11:token=t;object=k?color=red", "unknown query attribute"),
        ("pkcs11:token=my token;object=k", "must be percent-encoded"),
        ("pkcs11:token=%ff;object=k", "not UTF-8"),
        ("pkcs11:token=t;id=", "id= is empty"),
    ],
)
def test_bad_uris_say_what_is_wrong(uri: str, why: str) -> None:
    with pytest.raises(BadKeyUri, match=why) as caught:
        parse_pkcs11_uri(uri)
    assert "1234" not in caught.value.why


def test_pin_from_file_or_environment_never_empty(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("s3cret\n")
    assert read_pin(pin_file, {}) == "s3cret"
    assert read_pin(None, {"FLEETPKI_PKCS11_PIN": "from-env"}) == "from-env"
    with pytest.raises(SignerUnavailable, match="no token PIN"):
        read_pin(None, {})
    with pytest.raises(SignerUnavailable, match="cannot read PIN file"):
        read_pin(tmp_path / "absent", {})
    (tmp_path / "empty").write_text("")
    with pytest.raises(SignerUnavailable, match="no token PIN"):
        read_pin(tmp_path / "empty", {})
