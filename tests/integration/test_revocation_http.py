"""CRL and OCSP served by the real aiohttp handlers, checked by real relying parties (openssl)."""

from __future__ import annotations

import asyncio
import base64
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from multidict import CIMultiDict
from yarl import URL

from enroll_server.registry import Registry
from enroll_server.revocation.routes import CRL_TYPE, OCSP_RESPONSE_TYPE, revocation_routes
from enroll_server.revocation.state import OcspSignerPolicy, RevocationState
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet, run
from tests.pki_helpers import MemoryCa, issued_record, make_ca


class Served:
    def __init__(self, fleet: Fleet, state: RevocationState, base: str) -> None:
        self.fleet = fleet
        self.state = state
        self.base = base

    @property
    def ocsp_url(self) -> str:
        return f"{self.base}/ocsp"


async def _serve(fleet: Fleet, policy: OcspSignerPolicy) -> AsyncIterator[Served]:
    state = RevocationState.from_registry(
        fleet.registry, fleet.ca.issuing, signer_policy=policy, poll_interval=0.05
    )
    app = web.Application()
    app.add_routes(revocation_routes(state))
    state.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(fleet, state, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.fixture
def fleet(ca: MemoryCa, tmp_path: Path) -> Iterator[Fleet]:
    registry = Registry.open(tmp_path / "registry.db")
    yield Fleet(ca, registry, tmp_path)
    registry.close()


@pytest.fixture(params=["issuer-signed", "delegated"])
async def served(fleet: Fleet, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    policy = OcspSignerPolicy(delegated=request.param == "delegated")
    async for s in _serve(fleet, policy):
        yield s


@pytest.fixture
async def served_plain(fleet: Fleet) -> AsyncIterator[Served]:
    async for s in _serve(fleet, OcspSignerPolicy()):
        yield s


async def _get(url: str | URL, **kw: object) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _post_ocsp(url: str, body: bytes) -> tuple[int, str, ocsp.OCSPResponse]:
    headers = {"Content-Type": "application/ocsp-request"}
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, r.content_type, ocsp.load_der_ocsp_response(await r.read())


async def _wait_for_crl(
    served: Served, serial: int, listed: bool
) -> x509.CertificateRevocationList:
    """The served CRL once `serial` is (or is no longer) on it; bounded wait."""
    served.state.changed()
    for _ in range(100):
        _, _, body = await _get(f"{served.base}/crl")
        crl = x509.load_der_x509_crl(body)
        if (crl.get_revoked_certificate_by_serial_number(serial) is not None) == listed:
            return crl
        await asyncio.sleep(0.05)
    raise AssertionError(f"serial {serial:x} listed={not listed} after 5 s")


async def _openssl_verify(served: Served, device: str, tmp: Path) -> tuple[int, str]:
    _, _, body = await _get(f"{served.base}/crl.pem")
    crl_file = tmp / "served-crl.pem"
    crl_file.write_bytes(body)
    return await run(
        "openssl",
        "verify",
        "-crl_check",
        "-CAfile",
        str(served.fleet.chain_file()),
        "-CRLfile",
        str(crl_file),
        str(served.fleet.cert_file(device)),
    )


async def _openssl_ocsp(served: Served, device: str) -> tuple[int, str]:
    return await run(
        "openssl",
        "ocsp",
        "-url",
        served.ocsp_url,
        "-issuer",
        str(served.fleet.issuing_file()),
        "-CAfile",
        str(served.fleet.chain_file()),
        "-cert",
        str(served.fleet.cert_file(device)),
    )


# ---------------------------------------------------------------------------- CRL


async def test_crl_endpoints_serve_the_same_signed_crl(served_plain: Served) -> None:
    status, headers, der = await _get(f"{served_plain.base}/crl")
    assert status == 200
    assert headers["Content-Type"] == CRL_TYPE
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(served_plain.fleet.ca.issuing.cert.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).critical
    status, headers, pem = await _get(f"{served_plain.base}/crl.pem")
    assert status == 200
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    assert x509.load_pem_x509_crl(pem) == crl
    # Revalidation with the ETag costs nothing when the CRL has not changed.
    status, _, body = await _get(
        f"{served_plain.base}/crl", headers={"If-None-Match": headers["ETag"]}
    )
    assert (status, body) == (304, b"")


async def test_openssl_verify_crl_check_good_then_revoked(served_plain: Served) -> None:
    fleet = served_plain.fleet
    good = fleet.enroll("crl-good-1")
    bad = fleet.enroll("crl-bad-1")
    fleet.registry.revoke_device(
        DeviceId("crl-bad-1"), reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    crl = await _wait_for_crl(served_plain, bad.serial_number, listed=True)
    assert crl.get_revoked_certificate_by_serial_number(good.serial_number) is None

    code, out = await _openssl_verify(served_plain, "crl-good-1", fleet.folder)
    assert code == 0, out
    assert "OK" in out
    code, out = await _openssl_verify(served_plain, "crl-bad-1", fleet.folder)
    assert code != 0
    assert "certificate revoked" in out


async def test_suspend_lists_on_hold_and_resume_removes_it(served_plain: Served) -> None:
    fleet = served_plain.fleet
    cert = fleet.enroll("crl-hold-1")
    did = DeviceId("crl-hold-1")
    first = x509.load_der_x509_crl((await _get(f"{served_plain.base}/crl"))[2])
    fleet.registry.suspend_device(did, now=datetime.now(UTC), actor="test")
    crl = await _wait_for_crl(served_plain, cert.serial_number, listed=True)
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.certificate_hold
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    code, out = await _openssl_verify(served_plain, "crl-hold-1", fleet.folder)
    assert code != 0 and "certificate revoked" in out

    fleet.registry.resume_device(did, now=datetime.now(UTC), actor="test")
    await _wait_for_crl(served_plain, cert.serial_number, listed=False)
    code, out = await _openssl_verify(served_plain, "crl-hold-1", fleet.folder)
    assert code == 0, out


async def test_revocation_by_another_process_reaches_the_crl(
    served_plain: Served, tmp_path: Path
) -> None:
    # A second connection to the same file stands for the CLI revoking while `serve` runs;
    # no changed() poke: the publisher must notice through the event log alone.
    fleet = served_plain.fleet
    cert = fleet.enroll("crl-other-proc-1")
    with Registry.open(tmp_path / "registry.db") as cli:
        cli.revoke_device(
            DeviceId("crl-other-proc-1"), reason="superseded", now=datetime.now(UTC), actor="cli"
        )
    for _ in range(100):
        crl = x509.load_der_x509_crl((await _get(f"{served_plain.base}/crl"))[2])
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("revocation from another connection never reached the CRL")


async def test_enrollments_alone_do_not_rebuild_the_crl(served_plain: Served) -> None:
    before = served_plain.state.crl().number
    for i in range(3):
        served_plain.fleet.enroll(f"crl-quiet-{i}")
    served_plain.state.changed()
    await asyncio.sleep(0.3)
    assert served_plain.state.crl().number == before


async def test_stale_crl_is_refreshed_before_next_update(fleet: Fleet) -> None:
    clock = [datetime.now(UTC).replace(microsecond=0)]
    state = RevocationState.from_registry(
        fleet.registry, fleet.ca.issuing, next_update=timedelta(hours=2), clock=lambda: clock[0]
    )
    first = state.crl()
    clock[0] += timedelta(minutes=30)
    assert state.refresh().published is None
    clock[0] += timedelta(minutes=35)  # past half of the (2 h + backdate) lifetime
    update = state.refresh()
    assert update.published is not None
    assert update.published.number > first.number
    assert update.published.next_update == clock[0] + timedelta(hours=2)


# ---------------------------------------------------------------------------- OCSP


async def test_openssl_ocsp_good_revoked_unknown(served: Served) -> None:
    fleet = served.fleet
    fleet.enroll("ocsp-good-1")
    fleet.enroll("ocsp-revoked-1")
    # Issued by our CA but never recorded: the registry does not know it.
    fleet.certs["ocsp-unknown-1"] = fleet.ca.device_cert("ocsp-unknown-1")
    fleet.registry.revoke_device(
        DeviceId("ocsp-revoked-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
    )

    code, out = await _openssl_ocsp(served, "ocsp-good-1")
    assert code == 0, out
    assert "Response verify OK" in out
    assert ": good" in out
    assert "nonce" not in out.lower()  # a missing or wrong nonce makes openssl warn

    code, out = await _openssl_ocsp(served, "ocsp-revoked-1")
    assert "Response verify OK" in out, out
    assert ": revoked" in out
    assert "Reason: keyCompromise" in out
    assert "Revocation Time" in out

    code, out = await _openssl_ocsp(served, "ocsp-unknown-1")
    assert "Response verify OK" in out, out
    assert ": unknown" in out


async def test_ocsp_over_post_and_get_agree(served_plain: Served) -> None:
    fleet = served_plain.fleet
    cert = fleet.enroll("ocsp-get-1")
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, fleet.ca.issuing.cert, hashes.SHA256())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    status, ctype, resp = await _post_ocsp(served_plain.ocsp_url, req)
    assert (status, ctype) == (200, OCSP_RESPONSE_TYPE)
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD

    b64 = base64.b64encode(req).decode()
    for path in (urllib.parse.quote(b64, safe=""), b64):  # escaped, and raw with '/' and '+'
        status, headers, body = await _get(URL(f"{served_plain.base}/ocsp/{path}", encoded=True))
        assert status == 200
        assert headers["Content-Type"] == OCSP_RESPONSE_TYPE
        assert "max-age" in headers["Cache-Control"]
        got = ocsp.load_der_ocsp_response(body)
        assert got.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert got.serial_number == cert.serial_number


async def test_ocsp_sees_revocation_immediately(served_plain: Served) -> None:
    fleet = served_plain.fleet
    cert = fleet.enroll("ocsp-now-1")
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, fleet.ca.issuing.cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert (await _post_ocsp(served_plain.ocsp_url, req))[2].certificate_status is (
        ocsp.OCSPCertStatus.GOOD
    )
    fleet.registry.revoke_device(
        DeviceId("ocsp-now-1"), reason="cessationOfOperation", now=datetime.now(UTC), actor="t"
    )
    resp = (await _post_ocsp(served_plain.ocsp_url, req))[2]
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.cessation_of_operation


@pytest.mark.parametrize(
    "body",
    [b"", b"garbage", b"\x30\x82\xff\xff", b"\x30\x03\x02\x01\x01", bytes(17_000)],
    ids=["empty", "text", "bad-length", "wrong-structure", "oversized"],
)
async def test_malformed_post_gets_malformed_request_not_500(
    served_plain: Served, body: bytes
) -> None:
    status, ctype, resp = await _post_ocsp(served_plain.ocsp_url, body)
    assert (status, ctype) == (200, OCSP_RESPONSE_TYPE)
    assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert served_plain.state.outcomes["malformedRequest"] >= 1


@pytest.mark.parametrize("path", ["", "%%%%", "not*base64", "QUJD%ZZ", "a"])
async def test_get_with_broken_base64_is_malformed_request(served_plain: Served, path: str) -> None:
    status, headers, body = await _get(URL(f"{served_plain.base}/ocsp/{path}", encoded=True))
    assert status == 200
    assert headers["Content-Type"] == OCSP_RESPONSE_TYPE
    assert "Cache-Control" not in headers
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_unknown_issuer_hash_is_unauthorized(served_plain: Served) -> None:
    stranger = make_ca()
    cert, _ = stranger.device_cert("ocsp-stranger-1")
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, stranger.issuing.cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    _, _, resp = await _post_ocsp(served_plain.ocsp_url, req)
    assert resp.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    # And what openssl makes of it: an error status, not a crash or a "good".
    issuer = served_plain.fleet.folder / "stranger-issuing.pem"
    issuer.write_bytes(stranger.issuing.cert.public_bytes(serialization.Encoding.PEM))
    leaf = served_plain.fleet.folder / "stranger-leaf.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    code, out = await run(
        "openssl", "ocsp", "-url", served_plain.ocsp_url, "-issuer", str(issuer), "-cert", str(leaf)
    )
    assert code != 0
    assert "unauthorized" in out.lower()


async def test_ocsp_on_hold_is_revoked_with_certificate_hold_then_good_again(
    served_plain: Served,
) -> None:
    fleet = served_plain.fleet
    cert = fleet.enroll("ocsp-hold-1")
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, fleet.ca.issuing.cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    did = DeviceId("ocsp-hold-1")
    fleet.registry.suspend_device(did, now=datetime.now(UTC), actor="t")
    resp = (await _post_ocsp(served_plain.ocsp_url, req))[2]
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.certificate_hold
    fleet.registry.resume_device(did, now=datetime.now(UTC), actor="t")
    resp = (await _post_ocsp(served_plain.ocsp_url, req))[2]
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD


async def test_superseded_certificate_stays_good_until_it_expires(served_plain: Served) -> None:
    # Renewal supersedes the old certificate; it is not revoked (DESIGN: hot-swapped renewal).
    fleet = served_plain.fleet
    old = fleet.enroll("ocsp-renew-1")
    now = datetime.now(UTC)
    new, _ = fleet.ca.device_cert("ocsp-renew-1", now=now)
    fleet.registry.record_issuance(
        issued_record(new, "ocsp-renew-1"),
        consume_token_hash=None,
        supersedes_serial=old.serial_number,
        now=now,
        actor="t",
    )
    assert fleet.registry.get_certificate(old.serial_number).status.value == "superseded"  # type: ignore[union-attr]
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(old, fleet.ca.issuing.cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    resp = (await _post_ocsp(served_plain.ocsp_url, req))[2]
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD


def test_delegated_signer_is_renewed_at_half_life(fleet: Fleet) -> None:
    policy = OcspSignerPolicy(delegated=True, signer_validity=timedelta(days=2))
    state = RevocationState.from_registry(fleet.registry, fleet.ca.issuing, signer_policy=policy)
    now = datetime.now(UTC)
    first = state.responder(now)
    assert first.delegated
    assert state.responder(now + timedelta(hours=23)) is first
    second = state.responder(now + timedelta(hours=25))
    assert second.signer_cert.serial_number != first.signer_cert.serial_number
    assert second.signer_cert.not_valid_after_utc > first.signer_cert.not_valid_after_utc
