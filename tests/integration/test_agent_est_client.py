"""The agent's EST client against a real TLS HTTP server on 127.0.0.1 (a scripted EST stand-in
that answers with real certificates from the test CA), covering the wire cases the real service
rarely produces: 202 + Retry-After, 5xx, raw DER, chunked bodies."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from device_agent.config import EstServer
from device_agent.errors import (
    DeviceRevoked,
    DeviceSuspended,
    EstRejected,
    EstRetryLater,
    EstUnavailable,
    TlsVerificationFailed,
)
from device_agent.est_client import EstClient
from device_agent.est_wire import build_csr
from device_agent.keys import KeyType, generate_key, private_key_pem
from enroll_server.pki.keys import private_key_pem as server_key_pem
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa, make_ca

DEV = DeviceId("dev-000001")


@dataclass
class Script:
    """What the stand-in answers; each test sets it up."""

    ca: MemoryCa
    token: str = "tok-1"
    status: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    seen: list[web.Request] = field(default_factory=list)
    peer_cns: list[str] = field(default_factory=list)
    binary: bool = False
    chunked: bool = False


def _p7(certs: list[x509.Certificate]) -> bytes:
    return pkcs7.serialize_certificates(certs, Encoding.DER)


def make_app(script: Script) -> web.Application:
    async def reply(body_der: bytes) -> web.StreamResponse:
        if script.binary:
            return web.Response(
                body=body_der,
                content_type="application/pkcs7-mime",
                headers={"Content-Transfer-Encoding": "binary"},
            )
        return web.Response(
            body=base64.encodebytes(body_der), content_type="application/pkcs7-mime"
        )

    async def scripted(request: web.Request) -> web.StreamResponse | None:
        script.seen.append(request)
        if script.status:
            status, headers, body = script.status.pop(0)
            return web.Response(status=status, headers=headers, body=body)
        return None

    async def cacerts(request: web.Request) -> web.StreamResponse:
        if (early := await scripted(request)) is not None:
            return early
        der = _p7([script.ca.issuing.cert, script.ca.root.cert])
        if script.chunked:
            resp = web.StreamResponse(headers={"Content-Type": "application/pkcs7-mime"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            data = base64.encodebytes(der)
            for i in range(0, len(data), 100):
                await resp.write(data[i : i + 100])
            await resp.write_eof()
            return resp
        return await reply(der)

    async def enroll(request: web.Request) -> web.StreamResponse:
        if (early := await scripted(request)) is not None:
            return early
        auth = request.headers.get("Authorization", "")
        user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        if user != DEV.value or password != script.token:
            return web.Response(
                status=401,
                text="token already used or unknown",
                headers={"WWW-Authenticate": 'Basic realm="est"'},
            )
        csr = x509.load_der_x509_csr(base64.b64decode(await request.read()))
        cert = _issue(script.ca, csr)
        return await reply(_p7([cert, script.ca.issuing.cert]))

    async def reenroll(request: web.Request) -> web.StreamResponse:
        if (early := await scripted(request)) is not None:
            return early
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if not peer:
            return web.Response(status=401, text="client certificate required")
        cn = dict(x[0] for x in peer["subject"])["commonName"]
        script.peer_cns.append(cn)
        csr = x509.load_der_x509_csr(base64.b64decode(await request.read()))
        return await reply(_p7([_issue(script.ca, csr)]))

    app = web.Application()
    app.router.add_get("/.well-known/est/cacerts", cacerts)
    app.router.add_post("/.well-known/est/simpleenroll", enroll)
    app.router.add_post("/.well-known/est/simplereenroll", reenroll)
    return app


def _issue(ca: MemoryCa, csr: x509.CertificateSigningRequest) -> x509.Certificate:
    from datetime import UTC, datetime

    from enroll_server.pki.profile import DeviceProfile, build_device_certificate

    return build_device_certificate(
        csr.public_key(),  # type: ignore[arg-type]
        DEV,
        ca.issuing,
        datetime.now(UTC),
        DeviceProfile(),
    )


@dataclass
class Env:
    script: Script
    client: EstClient
    anchor: Path
    tmp: Path


def _server_ssl(ca: MemoryCa, tmp: Path) -> ssl.SSLContext:
    chain = tmp / "server-chain.pem"
    chain.write_bytes(
        ca.server_cert.public_bytes(Encoding.PEM) + ca.issuing.cert.public_bytes(Encoding.PEM)
    )
    key = tmp / "server-key.pem"
    key.write_bytes(server_key_pem(ca.server_key, None))
    anchor = tmp / "root.pem"
    anchor.write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(anchor))
    ctx.load_cert_chain(str(chain), str(key))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # RFC 7030 3.3.2: client certs are optional at TLS
    return ctx


@pytest.fixture
async def env(ca: MemoryCa, tmp_path: Path) -> AsyncIterator[Env]:
    script = Script(ca)
    runner = web.AppRunner(make_app(script))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_ssl(ca, tmp_path))
    await site.start()
    port = runner.addresses[0][1]
    anchor = tmp_path / "ca.pem"
    anchor.write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
    server = EstServer(f"https://localhost:{port}", "localhost", port, "")
    try:
        yield Env(script, EstClient(server, anchor, timeout=5), anchor, tmp_path)
    finally:
        await runner.cleanup()


async def test_cacerts_plain_binary_and_chunked(env: Env) -> None:
    want = {env.script.ca.issuing.cert, env.script.ca.root.cert}
    assert set(await env.client.cacerts()) == want
    env.script.binary = True
    assert set(await env.client.cacerts()) == want
    env.script.binary, env.script.chunked = False, True
    assert set(await env.client.cacerts()) == want
    assert env.client.last_server_date is not None


async def test_simpleenroll_sends_basic_auth_and_base64_csr(env: Env) -> None:
    key = generate_key(KeyType.EC_P256)
    certs = await env.client.simpleenroll(build_csr(key, DEV), DEV, "tok-1")
    leaf = next(c for c in certs if c.subject != env.script.ca.issuing.cert.subject)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    request = env.script.seen[-1]
    assert request.headers["Content-Type"] == "application/pkcs10"
    assert request.headers["Authorization"].startswith("Basic ")


async def test_used_token_is_401_with_reason(env: Env) -> None:
    with pytest.raises(EstRejected) as info:
        await env.client.simpleenroll(build_csr(generate_key(KeyType.EC_P256), DEV), DEV, "old")
    assert info.value.status == 401
    assert info.value.reason == "token already used or unknown"
    assert not isinstance(info.value, DeviceRevoked)


async def test_refusals_are_told_apart_by_their_code_never_by_the_prose(env: Env) -> None:
    env.script.status = [
        (403, {"Fleetpki-Error": "device-revoked"}, b"device dev-000001 is revoked\n"),
        (403, {"Fleetpki-Error": "device-suspended"}, b"device dev-000001 is suspended\n"),
        # Prose that says "revoked" without the code is a plain refusal: the code decides.
        (403, {"Fleetpki-Error": "forbidden"}, b"device revoked? no: another device's cert\n"),
        (403, {}, b"device dev-000001 is revoked\n"),
    ]
    csr = build_csr(generate_key(KeyType.EC_P256), DEV)
    with pytest.raises(DeviceRevoked) as revoked:
        await env.client.simpleenroll(csr, DEV, "tok-1")
    assert revoked.value.code == "device-revoked"
    with pytest.raises(DeviceSuspended) as suspended:
        await env.client.simpleenroll(csr, DEV, "tok-1")
    assert suspended.value.reason == "device dev-000001 is suspended"
    for _ in range(2):
        with pytest.raises(EstRejected) as info:
            await env.client.simpleenroll(csr, DEV, "tok-1")
        assert type(info.value) is EstRejected and info.value.status == 403


async def test_202_retry_after_and_5xx(env: Env) -> None:
    env.script.status = [(202, {"Retry-After": "7"}, b""), (503, {}, b"database locked")]
    csr = build_csr(generate_key(KeyType.EC_P256), DEV)
    with pytest.raises(EstRetryLater) as later:
        await env.client.simpleenroll(csr, DEV, "tok-1")
    assert later.value.retry_after == 7
    with pytest.raises(EstUnavailable) as down:
        await env.client.simpleenroll(csr, DEV, "tok-1")
    assert down.value.status == 503 and "database locked" in str(down.value)
    assert await env.client.simpleenroll(csr, DEV, "tok-1")  # recovered


async def test_reenroll_over_mtls(env: Env) -> None:
    key = generate_key(KeyType.EC_P256)
    cert = _issue(env.script.ca, build_csr(key, DEV))
    key_path, cert_path = env.tmp / "key.pem", env.tmp / "cert.pem"
    key_path.write_bytes(private_key_pem(key))
    cert_path.write_bytes(
        cert.public_bytes(Encoding.PEM) + env.script.ca.issuing.cert.public_bytes(Encoding.PEM)
    )
    new_key = generate_key(KeyType.EC_P256)
    certs = await env.client.simplereenroll(build_csr(new_key, DEV), cert_path, key_path)
    assert env.script.peer_cns == [DEV.value]
    assert certs[0].public_key().public_numbers() == new_key.public_key().public_numbers()  # type: ignore[union-attr]


async def test_wrong_trust_anchor_is_refused(env: Env) -> None:
    stranger = make_ca()
    env.anchor.write_bytes(stranger.root.cert.public_bytes(Encoding.PEM))
    with pytest.raises(TlsVerificationFailed, match="unverified"):
        await env.client.cacerts()
    assert env.script.seen == []  # not a single request reached the server


async def test_hostname_is_checked(ca: MemoryCa, tmp_path: Path) -> None:
    """A server certificate from the right CA but for another name is refused."""
    from datetime import UTC, datetime

    from enroll_server.pki.ca import build_server_certificate
    from enroll_server.pki.keys import KeyType as ServerKeyType
    from enroll_server.pki.keys import generate_key as server_generate_key

    other_key = server_generate_key(ServerKeyType.EC_P256)
    other = build_server_certificate(
        other_key.public_key(), ca.issuing, ["other.example"], datetime.now(UTC)
    )
    wrong = MemoryCa(ca.root, ca.issuing, other, other_key)
    script = Script(wrong)
    runner = web.AppRunner(make_app(script))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_ssl(wrong, tmp_path))
    await site.start()
    try:
        port = runner.addresses[0][1]
        anchor = tmp_path / "ca.pem"
        anchor.write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
        client = EstClient(EstServer("", "127.0.0.1", port, ""), anchor, timeout=5)
        with pytest.raises(TlsVerificationFailed, match="mismatch"):
            await client.cacerts()
        assert script.seen == []
    finally:
        await runner.cleanup()


async def test_server_down_is_unavailable(anchor_only: Callable[[], Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = EstClient(EstServer("", "127.0.0.1", port, ""), anchor_only(), timeout=2)
    with pytest.raises(EstUnavailable):
        await client.cacerts()


@pytest.fixture
def anchor_only(ca: MemoryCa, tmp_path: Path) -> Callable[[], Path]:
    def make() -> Path:
        path = tmp_path / "a.pem"
        path.write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
        return path

    return make
