"""`fleetpki node add`: another node's home from an existing one, serving the same fleet."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import HomeLayout
from fleetpki.identity import DeviceId
from tests.est_client import request
from tests.integration.test_est import enroll, leaf
from tests.live_server import make_home, start_live_server
from tests.pg_cluster import PASSWORD


def _node_add(home: Path, out: Path, *names: str) -> tuple[int, str]:
    args = ["node", "add", "--home", str(home), "--out", str(out)]
    for name in names:
        args += ["--hostname", name]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_a_node_home_serves_the_same_fleet_with_its_own_certificate(
    tmp_path: Path, pg_url: str
) -> None:
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    first = make_home(tmp_path / "a", registry=bare, registry_password=PASSWORD)
    code, output = _node_add(first.root, tmp_path / "b", "node-b.example", "127.0.0.1")
    assert code == 0, output
    node = HomeLayout(tmp_path / "b")
    assert not node.admin_token.exists() and not node.registry.exists()
    assert node.root_cert.read_bytes() == first.root_cert.read_bytes()
    for secret in (node.server_key, node.issuing_key, node.root_key, node.passphrase_file):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    own = x509.load_pem_x509_certificate(node.server_cert.read_bytes())
    theirs = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    assert own.public_key() != theirs.public_key()
    sans = own.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node-b.example" in sans.get_values_for_type(x509.DNSName)
    a = start_live_server(first.root)
    try:
        b = start_live_server(node.root)
        try:
            # A token made through node A is spent at node B: one registry, one fleet.
            token = a.mint_device("node-dev-1")
            reply = enroll(b, "node-dev-1", token)
            assert reply.status == 200, reply.text
            cert = leaf(decode_certs_only(reply.body))
            assert len(a.registry.certificates_of(DeviceId("node-dev-1"))) == 1
            pem = tmp_path / "dev.pem"
            pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            verified = subprocess.run(
                ["openssl", "verify", "-CAfile", str(first.root_cert), "-untrusted",
                 str(first.issuing_cert), str(pem)],
                capture_output=True, text=True,
            )  # fmt: skip
            assert verified.returncode == 0, verified.stderr
        finally:
            b.stop()
    finally:
        a.stop()


def test_a_node_added_after_a_root_rollover_serves_the_cross_certificates(
    tmp_path: Path, pg_url: str
) -> None:
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    first = make_home(tmp_path / "a", registry=bare, registry_password=PASSWORD)
    rolled = CliRunner().invoke(app, ["ca", "rollover-root", "--home", str(first.root)])
    assert rolled.exit_code == 0, rolled.output
    code, output = _node_add(first.root, tmp_path / "b", "node-b.example")
    assert code == 0, output
    node = HomeLayout(tmp_path / "b")
    assert node.root_update.read_bytes() == first.root_update.read_bytes()
    # Its own server certificate (from the old root's issuing CA) ends with new-signed-old.
    new_with_old = x509.load_pem_x509_certificates(first.root_update.read_bytes())[1]
    assert x509.load_pem_x509_certificates(node.server_cert.read_bytes())[-1] == new_with_old


def test_a_sqlite_home_and_a_used_folder_are_refused_with_nothing_written(
    tmp_path: Path, pg_url: str
) -> None:
    lone = make_home(tmp_path / "lone")
    code, output = _node_add(lone.root, tmp_path / "n1", "n1.example")
    assert code == 2 and "PostgreSQL" in output, output
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n1.partial").exists()
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    shared = make_home(tmp_path / "shared", registry=bare, registry_password=PASSWORD)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code, output = _node_add(shared.root, used, "n2.example")
    assert code == 2 and "not empty" in output, output
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    code, output = _node_add(shared.root, tmp_path / "n3")
    assert code == 2 and "--hostname" in output, output


def test_a_node_added_after_an_issuing_ca_rollover_serves_both_issuers(
    tmp_path: Path, pg_url: str
) -> None:
    """The previous issuing CA and which issuer owns /crl go with the node: its certificates
    name the new issuer's /crl/<id>, and it serves the old issuer's CRL at /crl."""
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    first = make_home(tmp_path / "a", registry=bare, registry_password=PASSWORD)
    old = x509.load_pem_x509_certificate(first.issuing_cert.read_bytes())
    a = start_live_server(first.root)
    try:  # a certificate of the old issuer keeps it live (else it retires at once)
        assert enroll(a, "node-dev-old", a.mint_device("node-dev-old")).status == 200
    finally:
        a.stop()
    rolled = CliRunner().invoke(app, ["ca", "rollover", "--home", str(first.root), "--json"])
    assert rolled.exit_code == 0, rolled.output
    new_id = json.loads(rolled.output)["new"]
    code, output = _node_add(first.root, tmp_path / "b", "node-b.example", "127.0.0.1")
    assert code == 0, output
    node = HomeLayout(tmp_path / "b")
    assert node.chain.read_bytes() == first.chain.read_bytes()
    b = start_live_server(node.root)
    try:
        reply = enroll(b, "node-dev-2", b.mint_device("node-dev-2"))
        assert reply.status == 200, reply.text
        cert = leaf(decode_certs_only(reply.body))
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert str(cdp[0].full_name[0].value).endswith(f"/crl/{new_id}")  # type: ignore[index]
        crl = x509.load_der_x509_crl(request(b.http_url + "/crl", None).body)
        assert crl.is_signature_valid(old.public_key())  # /crl: the old issuer's, still live
    finally:
        b.stop()
