"""Issuing-CA rollover and a compromised issuing CA, against the real service: a fleet of real
agents on the embedded broker through `fleetpki ca rollover` (6-second certificates), each
issuer's CRL and OCSP, openssl against chain.pem, retirement by itself, and `ca revoke-issuing`
followed by re-keying."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from typer.testing import CliRunner

from device_agent.events import AgentEvent, EventKind
from enroll_server.cli.app import app
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.issuers import IssuerFiles
from enroll_server.pki.key_id import key_id
from enroll_server.pki.ocsp import cert_id_hashes
from enroll_server.pki.profile import DeviceProfile
from enroll_server.revocation.routes import OCSP_REQUEST_TYPE
from tests.est_client import ask_ocsp, request
from tests.integration.broker_harness import PAHO_ACCEPTED
from tests.integration.test_agent_e2e import bundle_for, make_agent, until
from tests.integration.test_est import EST
from tests.integration.test_renewal_lifecycle import connack, enrolled
from tests.live_server import LiveServer, start_live_server

PLANNED = "reconnecting with the renewed certificate"  # mqtt_link: a renewal's reconnect
runner = CliRunner()


def aki(cert: x509.Certificate) -> str:
    value = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert value.key_identifier is not None
    return value.key_identifier.hex()


def cacerts(server: LiveServer) -> list[x509.Certificate]:
    reply = request(server.est_url + EST + "/cacerts", server.client_ssl())
    assert reply.status == 200
    return decode_certs_only(reply.body)


def issuing_ids(certs: list[x509.Certificate]) -> set[str]:
    """The issuing CAs among `certs` (the self-signed root left out)."""
    return {key_id(c) for c in certs if c.subject != c.issuer}


def crl_at(server: LiveServer, path: str) -> x509.CertificateRevocationList:
    reply = request(server.http_url + path, None)
    assert reply.status == 200, (path, reply.status, reply.text)
    return x509.load_der_x509_crl(reply.body)


def idp_url(crl: x509.CertificateRevocationList) -> str:
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert idp.full_name is not None
    return str(idp.full_name[0].value)


def cdp_url(cert: x509.Certificate) -> str:
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name is not None
    return str(cdp[0].full_name[0].value)


def openssl_verify(
    chain: Path, cert: x509.Certificate, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """openssl verify at a second after the certificate's notBefore (6-second certificates)."""
    leaf = tmp / f"{cert.serial_number:x}.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    at = int(cert.not_valid_before_utc.timestamp()) + 2
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(chain),
            "-purpose",
            "sslclient",
            "-attime",
            str(at),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def rollover(server: LiveServer) -> str:
    result = runner.invoke(app, ["ca", "rollover", "--home", str(server.layout.root), "--json"])
    assert result.exit_code == 0, result.output
    return str(json.loads(result.output)["new"])


@pytest.fixture
def fleet_stack(tmp_path: Path) -> Iterator[LiveServer]:
    """The service + broker issuing 6-second certificates, looking at its CA files every 0.2 s."""
    profile = DeviceProfile(validity=timedelta(seconds=6), backdate=timedelta(seconds=1))
    server = start_live_server(
        tmp_path / "home", broker=True, profile=profile, cert_check_interval=0.2
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LiveServer]:
    """The service + broker (1-day certificates), looking at its CA files every 0.2 s."""
    server = start_live_server(tmp_path / "home", broker=True, cert_check_interval=0.2)
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


async def test_a_fleet_of_agents_keeps_working_through_an_issuing_ca_rollover(
    fleet_stack: LiveServer, tmp_path: Path
) -> None:
    server = fleet_stack
    layout = server.layout
    old_id = key_id(x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes()))
    events: Counter[str] = Counter()
    unplanned: list[str] = []

    def watch(name: str):  # type: ignore[no-untyped-def]
        def on_event(event: AgentEvent) -> None:
            events[event.kind.value] += 1
            if event.kind is EventKind.DISCONNECTED and event.reason != PLANNED:
                unplanned.append(f"{name}: disconnected: {event.reason}")
            if event.kind is EventKind.RETRY:
                unplanned.append(f"{name}: retry {event.what}: {event.why}")

        return on_event

    names = [f"dev-rol{i:03d}" for i in range(4)]
    agents = [
        make_agent(bundle_for(server, tmp_path, name), on_event=watch(name)) for name in names
    ]
    tasks = [asyncio.create_task(a.run()) for a in agents]

    def issuers() -> set[str]:
        out = set()
        for agent in agents:
            if agent.identity is None:
                return {"none"}
            cert = x509.load_pem_x509_certificate(agent.identity.cert_path.read_bytes())
            out.add(aki(cert))
        return out

    try:
        await until(lambda: all(a.renewals >= 1 and a.link and a.link.connected.is_set()
                                for a in agents), 15, "renewed once")  # fmt: skip
        assert issuers() == {old_id}
        old_cert = x509.load_pem_x509_certificate(agents[0].identity.cert_path.read_bytes())  # type: ignore[union-attr]
        new_id = await asyncio.to_thread(rollover, server)
        # Every agent renews onto the new issuer, on its own schedule.
        await until(lambda: issuers() == {new_id}, 20, "renewed onto the new issuer")
        await until(lambda: all(a.link and a.link.connected.is_set() for a in agents), 5, "up")
        new_cert = x509.load_pem_x509_certificate(agents[0].identity.cert_path.read_bytes())  # type: ignore[union-attr]

        # Both issuers are live: /cacerts and chain.pem carry both, each has its CRL.
        chain = layout.chain.read_bytes()
        live = issuing_ids(x509.load_pem_x509_certificates(chain))
        if old_id in live:  # not yet retired (its last certificates expire within 6 s)
            assert issuing_ids(cacerts(server)) == {new_id, old_id}
            old_issuer = next(
                c for c in x509.load_pem_x509_certificates(chain) if key_id(c) == old_id
            )
            old_crl = crl_at(server, "/crl")
            assert old_crl.is_signature_valid(old_issuer.public_key())
            assert idp_url(old_crl) == cdp_url(old_cert)
            assert cdp_url(old_cert).endswith("/crl")
            # At a time the old certificate was valid: it chains through chain.pem.
            verified = openssl_verify(layout.chain, old_cert, tmp_path)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        new_issuer = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        new_crl = crl_at(server, f"/crl/{new_id}")
        assert new_crl.is_signature_valid(new_issuer.public_key())
        assert idp_url(new_crl) == cdp_url(new_cert)
        assert cdp_url(new_cert).endswith(f"/crl/{new_id}")
        verified = openssl_verify(layout.chain, new_cert, tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        answer = await asyncio.to_thread(ask_ocsp, server.http_url, new_cert, new_issuer)
        assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert (
            answer.responder_key_hash
            == new_issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        )

        # The old issuer retires by itself once its last certificate has expired.
        files = IssuerFiles(layout)
        await until(lambda: (files.retired_dir / f"{old_id}.pem").exists(), 20, "retired")
        await until(lambda: len(cacerts(server)) == 2, 3, "cacerts without the old issuer")
        assert issuing_ids(cacerts(server)) == {new_id}
        assert not files.previous(old_id)[1].exists()  # its key is gone
        assert (files.retired_dir / f"{old_id}.crl").exists()
        assert request(server.http_url + f"/crl/{old_id}", None).status == 404
        # /crl now serves the current issuer's CRL.
        assert crl_at(server, "/crl").is_signature_valid(new_issuer.public_key())
        # Still all up (a renewal's planned reconnect may be under way at any instant).
        await until(lambda: all(a.link and a.link.connected.is_set() for a in agents), 5, "up")
        during = list(unplanned)  # before the agents stop ("stopped" is planned too)
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert during == [], during
    assert events["renewed"] >= 2 * len(agents)


async def test_old_and_new_certificates_connect_and_have_their_own_crl_and_ocsp(
    stack: LiveServer, tmp_path: Path
) -> None:
    server = stack
    old = enrolled(server, tmp_path / "a", "dev-old01")
    old_issuer = x509.load_pem_x509_certificate(server.layout.issuing_cert.read_bytes())
    new_id = rollover(server)
    new_issuer = x509.load_pem_x509_certificate(server.layout.issuing_cert.read_bytes())
    assert key_id(new_issuer) == new_id
    # The CN differs: agents and OpenSSL find issuers by name.
    assert new_issuer.subject != old_issuer.subject
    assert new_issuer.issuer == old_issuer.issuer

    wait_for(lambda: any(key_id(c) == new_id for c in cacerts(server)), "rollover picked up")
    new = enrolled(server, tmp_path / "b", "dev-new01")
    assert aki(new.cert) == new_id and aki(old.cert) == key_id(old_issuer)
    # Each certificate's caIssuers (AIA) and CDP name its own issuer's certificate and CRL.
    for held, issuer in ((old, old_issuer), (new, new_issuer)):
        aia = held.cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        url = next(
            str(d.access_location.value)
            for d in aia
            if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS
        )
        fetched = request(server.http_url + "/" + url.split("/", 3)[3], None)
        assert x509.load_der_x509_certificate(fetched.body) == issuer, url
    # The broker trusts both issuers, for clients that present their certificate alone.
    assert await connack(server, old) == PAHO_ACCEPTED
    assert await connack(server, new) == PAHO_ACCEPTED
    for held, issuer in ((old, old_issuer), (new, new_issuer)):
        verified = openssl_verify(server.layout.chain, held.cert, tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        answer = ask_ocsp(server.http_url, held.cert, issuer)
        assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    # A CertID naming the new issuer with the old issuer's serial: not one it signed.
    name_hash, key_hash = cert_id_hashes(new_issuer, hashes.SHA1())
    crossed = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, old.serial, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    reply = request(
        server.http_url + "/ocsp", None, "POST", crossed, {"Content-Type": OCSP_REQUEST_TYPE}
    )
    answer = ocsp.load_der_ocsp_response(reply.body)
    assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    assert answer.responder_key_hash == key_hash  # signed by the issuer the CertID names
    # Revoke one of each: each lands on its own issuer's CRL only.
    for held in (old, new):
        r = runner.invoke(
            app,
            ["cert", "revoke", f"{held.serial:x}", "--home", str(server.layout.root)],
        )
        assert r.exit_code == 0, r.output

    def listed(path: str, serial: int) -> bool:
        return crl_at(server, path).get_revoked_certificate_by_serial_number(serial) is not None

    wait_for(
        lambda: listed("/crl", old.serial) and listed(f"/crl/{new_id}", new.serial),
        "revocations on their issuers' CRLs",
    )
    assert not listed("/crl", new.serial)
    assert not listed(f"/crl/{new_id}", old.serial)
    assert crl_at(server, "/crl").is_signature_valid(old_issuer.public_key())
    assert crl_at(server, f"/crl/{new_id}").is_signature_valid(new_issuer.public_key())
    assert ask_ocsp(server.http_url, old.cert, old_issuer).certificate_status is (
        ocsp.OCSPCertStatus.REVOKED
    )


async def test_a_compromised_issuing_ca_is_revoked_at_the_root_and_its_devices_rekey(
    stack: LiveServer, tmp_path: Path
) -> None:
    server = stack
    home = str(server.layout.root)
    victim = enrolled(server, tmp_path / "v", "dev-cmp01")
    issued = runner.invoke(app, ["service", "issue", "svc-cmp", "--home", home])
    assert issued.exit_code == 0, issued.output
    bad_id = aki(victim.cert)
    bad_issuer = x509.load_pem_x509_certificate(server.layout.issuing_cert.read_bytes())
    assert await connack(server, victim) == PAHO_ACCEPTED
    # The current issuer cannot be revoked: roll over first.
    refused = runner.invoke(app, ["ca", "revoke-issuing", bad_id, "--home", home])
    assert refused.exit_code == 2 and "ca rollover" in refused.output
    unknown = runner.invoke(app, ["ca", "revoke-issuing", "00" * 20, "--home", home])
    assert unknown.exit_code == 2 and "no live previous issuing CA" in unknown.output
    assert not IssuerFiles(server.layout).revoked_dir.exists()
    new_id = rollover(server)
    wait_for(lambda: new_id in issuing_ids(cacerts(server)), "rollover picked up")
    bad_crl = crl_at(server, "/crl")  # the old CA's, as a relying party fetched it
    root = x509.load_pem_x509_certificate(server.layout.root_cert.read_bytes())

    def verify_all(root_crl: x509.CertificateRevocationList) -> subprocess.CompletedProcess[str]:
        """openssl checking the whole chain of the victim's certificate (-crl_check_all)."""
        crls = tmp_path / "crls.pem"
        crls.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (bad_crl, root_crl))
        )
        cas = tmp_path / "cas.pem"
        cas.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (bad_issuer, root))
        )
        leaf = tmp_path / "victim.pem"
        leaf.write_bytes(victim.cert.public_bytes(serialization.Encoding.PEM))
        return subprocess.run(
            ["openssl", "verify", "-crl_check_all", "-CAfile", str(cas), "-CRLfile", str(crls),
             str(leaf)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    before = verify_all(crl_at(server, "/root.crl"))
    assert before.returncode == 0, before.stdout + before.stderr
    result = runner.invoke(app, ["ca", "revoke-issuing", bad_id, "--home", home, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["devices"] == ["dev-cmp01", "svc-cmp"]
    # The root CRL lists the issuing CA (reason cACompromise); chain.pem no longer has it.
    wait_for(
        lambda: (
            crl_at(server, "/root.crl").get_revoked_certificate_by_serial_number(
                bad_issuer.serial_number
            )
            is not None
        ),
        "the root CRL served lists the revoked issuing CA",
    )
    root_crl = crl_at(server, "/root.crl")
    entry = root_crl.get_revoked_certificate_by_serial_number(bad_issuer.serial_number)
    assert entry is not None and root_crl.is_signature_valid(root.public_key())
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.ca_compromise
    )
    assert bad_id not in issuing_ids(
        x509.load_pem_x509_certificates(server.layout.chain.read_bytes())
    )
    wait_for(lambda: bad_id not in issuing_ids(cacerts(server)), "/cacerts without it")
    # A relying party checking the whole chain refuses the victim's certificate now.
    after = verify_all(root_crl)
    assert after.returncode != 0 and "certificate revoked" in after.stdout + after.stderr
    # The broker refuses the device; EST refuses to renew it; a re-key brings it back.
    assert await connack(server, victim) != PAHO_ACCEPTED
    rekey = runner.invoke(app, ["device", "rekey", "dev-cmp01", "--home", home, "--stdout"])
    assert rekey.exit_code == 0, rekey.output
    token = [line for line in rekey.output.splitlines() if line.strip()][-1].split()[-1]
    again = enrolled(server, tmp_path / "again", "dev-cmp01", token=token)
    assert aki(again.cert) == new_id
    assert await connack(server, again) == PAHO_ACCEPTED
    renewed = runner.invoke(app, ["service", "renew", "svc-cmp", "--home", home])
    assert renewed.exit_code == 0, renewed.output
    svc = server.layout.root / "services" / "svc-cmp" / "cert.pem"
    assert aki(x509.load_pem_x509_certificate(svc.read_bytes())) == new_id


def test_rollover_and_revocation_with_an_offline_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root key only in DIR: rollover and revoke-issuing need --root DIR; the revocation is
    kept in DIR too, so a later CRL ceremony on a machine with no home still lists it."""
    monkeypatch.delenv("FLEETPKI_HOME", raising=False)
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", "a long root passphrase")
    home, root_dir = tmp_path / "home", tmp_path / "usb"
    made = runner.invoke(app, ["init", "--home", str(home), "--root-offline", str(root_dir)])
    assert made.exit_code == 0, made.output
    issuing = home / "ca" / "issuing.pem"
    before = issuing.read_bytes()
    old_id = key_id(x509.load_pem_x509_certificate(before))
    refused = runner.invoke(app, ["ca", "rollover", "--home", str(home)])
    assert refused.exit_code == 2 and "--root DIR" in refused.output
    assert issuing.read_bytes() == before
    rolled = runner.invoke(
        app, ["ca", "rollover", "--home", str(home), "--root", str(root_dir), "--json"]
    )
    assert rolled.exit_code == 0, rolled.output
    root = x509.load_pem_x509_certificate((root_dir / "root.pem").read_bytes())
    new = x509.load_pem_x509_certificate(issuing.read_bytes())
    new.verify_directly_issued_by(root)
    assert key_id(new) == json.loads(rolled.output)["new"] != old_id
    assert issuing_ids(
        x509.load_pem_x509_certificates((home / "ca" / "chain.pem").read_bytes())
    ) == {
        old_id,
        key_id(new),
    }
    revoked = runner.invoke(
        app, ["ca", "revoke-issuing", old_id, "--home", str(home), "--root", str(root_dir)]
    )
    assert revoked.exit_code == 0, revoked.output
    old_serial = int(
        json.loads((home / "ca" / "revoked" / f"{old_id}.json").read_text())["serial"], 16
    )
    for crl_file in (home / "ca" / "root.crl", root_dir / "root.crl"):
        crl = x509.load_der_x509_crl(crl_file.read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None, crl_file
    # The next ceremony, on a machine with no home: the revocation stays on the root CRL.
    again = runner.invoke(app, ["ca", "sign-root-crl", "--root", str(root_dir)])
    assert again.exit_code == 0, again.output
    crl = x509.load_der_x509_crl((root_dir / "root.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    assert crl.is_signature_valid(root.public_key())
