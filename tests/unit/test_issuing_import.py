"""check_issuing_certificate: the pure checks on an issuing CA certificate signed elsewhere."""

from __future__ import annotations

from datetime import timedelta

import pytest

from enroll_server.pki.issuing_import import IssuingRejected, check_issuing_certificate
from enroll_server.pki.keys import KeyType, generate_key
from tests.ca_ceremony import NOW, OtherCa, other_pki_ca


def _ca(name: str, above: OtherCa | None, **options: object) -> OtherCa:
    key = generate_key(KeyType.EC_P256)
    signer = above.key if above is not None else key
    return OtherCa(other_pki_ca(name, key.public_key(), above, signer, **options), key)  # type: ignore[arg-type]


def test_two_intermediates_pass_and_come_back_in_order() -> None:
    root = _ca("Root", None)
    upper = _ca("Upper", root, path_length=2)
    lower = _ca("Lower", upper, path_length=1)
    issuing = _ca("Issuing", lower, path_length=0)
    # CHAIN in any order, with an unrelated CA in it: the path is found by name and signature.
    stray = _ca("Stray", None)
    chain = [root.cert, stray.cert, lower.cert, upper.cert]
    checked = check_issuing_certificate(issuing.cert, chain, issuing.key.public_key(), NOW)
    assert checked.intermediates == (lower.cert, upper.cert) and checked.root == root.cert


@pytest.mark.parametrize(
    ("root_path_length", "refused"), [(None, False), (2, False), (1, True), (0, True)]
)
def test_the_root_s_path_length_counts_every_ca_below_it(
    root_path_length: int | None, refused: bool
) -> None:
    # root -> intermediate -> issuing: the issuing CA is the 2nd CA below the root.
    root = _ca("Root", None, path_length=root_path_length)
    intermediate = _ca("Intermediate", root)
    issuing = _ca("Issuing", intermediate, path_length=0)
    chain = [intermediate.cert, root.cert]
    if not refused:
        check_issuing_certificate(issuing.cert, chain, issuing.key.public_key(), NOW)
        return
    with pytest.raises(IssuingRejected, match=f"the root .* has pathLen {root_path_length}"):
        check_issuing_certificate(issuing.cert, chain, issuing.key.public_key(), NOW)


def test_issuing_pathlen_is_not_a_constraint_on_devices() -> None:
    root = _ca("Root", None)
    issuing = _ca("Issuing", root, path_length=0)
    check_issuing_certificate(issuing.cert, [root.cert], issuing.key.public_key(), NOW)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ski": False}, "has no subjectKeyIdentifier"),
        ({"not_before": NOW + timedelta(days=1)}, "is not valid before"),
    ],
)
def test_issuing_refusals(options: dict[str, object], message: str) -> None:
    root = _ca("Root", None)
    issuing = _ca("Issuing", root, **options)
    with pytest.raises(IssuingRejected, match=message):
        check_issuing_certificate(issuing.cert, [root.cert], issuing.key.public_key(), NOW)


def test_a_self_signed_certificate_is_a_root_not_an_issuing_ca() -> None:
    root = _ca("Root", None)
    with pytest.raises(IssuingRejected, match="is self-signed"):
        check_issuing_certificate(root.cert, [], root.key.public_key(), NOW)


def test_an_expired_ca_above_is_named() -> None:
    root = _ca("Root", None)
    intermediate = _ca("Intermediate", root, not_after=NOW - timedelta(minutes=1))
    issuing = _ca("Issuing", intermediate)
    with pytest.raises(IssuingRejected, match=r"the intermediate CA .*Intermediate.* expired at"):
        check_issuing_certificate(
            issuing.cert, [intermediate.cert, root.cert], issuing.key.public_key(), NOW
        )
