"""A CA change made at one node reaches every node of a PostgreSQL registry by itself
(home/ca_state.py): `fleetpki ca rollover` and `ca revoke-issuing` run on node A's home, node
B (its own home, made by `fleetpki node add`) signs with, serves and trusts what A's home now
holds, without anyone copying H/ca/; a node that was down catches up when it starts; a node
that cannot adopt keeps serving and says so.

Real servers on 127.0.0.1:0 (two `start_server`s, each on its own home), the real CLI, the
session's throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.ca_state import GENERATION, PENDING, ca_change, follow, home_generation
from enroll_server.home.issuers import IssuerFiles, retire_expired
from enroll_server.home.layout import HomeLayout, load_home
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import load_private_key_pem, private_key_pem
from enroll_server.registry import Registry
from enroll_server.wiring.issuers import CA_STATE_POLL
from tests.est_client import ask_ocsp, request
from tests.integration.test_est import enroll, leaf
from tests.integration.test_issuing_rollover import aki, cacerts, crl_at, issuing_ids
from tests.integration.test_kill_cli import killed_at
from tests.kill_cli import cli
from tests.live_server import LiveServer, make_home, start_live_server
from tests.pg_cluster import PASSWORD
from tests.storm import Node

runner = CliRunner()
T = TypeVar("T")
# The bound README promises (NOTIFY at once, the CA_STATE_POLL poll as the safety net), with
# room for a loaded test machine.
BOUND_S = CA_STATE_POLL + 3.0


def _two_homes(tmp_path: Path, pg_url: str) -> tuple[HomeLayout, HomeLayout]:
    """Home A on the PostgreSQL registry, and node B's home made from it by `node add`."""
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    home_a = make_home(tmp_path / "a", registry=bare, registry_password=PASSWORD)
    out = tmp_path / "b"
    args = ["node", "add", "--home", str(home_a.root), "--out", str(out), "--hostname"]
    added = runner.invoke(app, [*args, "127.0.0.1"])
    assert added.exit_code == 0, added.output
    home_b = HomeLayout(out)
    # Operators live in the registry: A's token reads B's /metrics.
    home_b.admin_token.write_bytes(home_a.admin_token.read_bytes())
    return home_a, home_b


def _ca(*args: str) -> dict[str, object]:
    result = runner.invoke(app, ["ca", *args, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


@dataclass
class ServeProcess:
    """Node B as a real `fleetpki serve` process (tests/storm.py's Node), with what the
    helpers here use of a LiveServer."""

    node: Node
    admin_token: str
    shared: LiveServer  # node A, on the same registry: tokens minted there work at B

    def mint_device(self, device_id: str) -> str:
        return self.shared.mint_device(device_id)

    @property
    def est_url(self) -> str:
        return self.node.est_url

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"

    def client_ssl(self) -> ssl.SSLContext:
        return self.node.ssl()

    def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        url = f"https://127.0.0.1:{self.node.admin_port}/metrics"
        reply = request(url, self.client_ssl(), headers=headers)
        assert reply.status == 200, (reply.status, reply.text)
        return reply.text


Served = LiveServer | ServeProcess


def _issued(node: Served, device: str) -> x509.Certificate:
    reply = enroll(node, device, node.mint_device(device))  # type: ignore[arg-type]
    assert reply.status == 200, reply.text
    return leaf(decode_certs_only(reply.body))


def _within(what: str, probe: Callable[[], T | None], bound: float = BOUND_S) -> T:
    deadline = time.monotonic() + bound
    while True:
        found = probe()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"not within {bound} s: {what}"
        time.sleep(0.1)


def _chain_issuers(home: HomeLayout) -> set[str]:
    """The issuing CAs in a home's chain.pem (what its EST listener and broker trust)."""
    chain = x509.load_pem_x509_certificates(home.chain.read_bytes())
    return {key_id(c) for c in chain if c.subject != c.issuer}


def _metric(node: Served, name: str) -> str:
    """The value of one metric line of the node's /metrics."""
    (value,) = [
        line.split()[1] for line in node.metrics().splitlines() if line.startswith(name + " ")
    ]
    return value


def _ocsp_status(node: Served, cert: x509.Certificate, issuer: x509.Certificate) -> object:
    answer = ask_ocsp(node.http_url, cert, issuer)
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def test_a_ca_change_at_node_a_reaches_node_b_by_itself(tmp_path: Path, pg_url: str) -> None:
    home_a, home_b = _two_homes(tmp_path, pg_url)
    first = x509.load_pem_x509_certificate(home_a.issuing_cert.read_bytes())
    a = start_live_server(home_a.root)
    node = Node("b", home_b.root, tmp_path / "b.log", broker=False)
    b = ServeProcess(node, home_a.admin_token.read_text().strip(), a)
    try:
        old_cert = _issued(a, "ca-dev-1")  # keeps the first issuer live after rollovers

        # 1. Node B is down while A's home rolls over; B starts with the new issuer.
        second_id = str(_ca("rollover", "--home", str(home_a.root))["new"])
        node.start()
        try:
            node.wait_serving(30)
            cert = _issued(b, "ca-dev-2")
            assert aki(cert) == second_id, "node B signed with the issuer it had before"
            assert home_generation(home_b) == home_generation(home_a) == 1
            second = x509.load_pem_x509_certificate(home_b.issuing_cert.read_bytes())

            # 2. B running: A's home rolls over again; B follows within the bound.
            rolled_at = time.monotonic()
            third_id = str(_ca("rollover", "--home", str(home_a.root))["new"])

            by_second = ["ca-dev-2"]  # what B issued before it had adopted the rollover

            def signed_by_third() -> x509.Certificate | None:
                device = f"ca-dev-3-{len(by_second)}"
                issued = _issued(b, device)
                if aki(issued) == third_id:
                    return issued
                by_second.append(device)
                return None

            newest = _within("node B signs with the new issuing CA", signed_by_third)
            adopted_in = time.monotonic() - rolled_at
            assert adopted_in < BOUND_S
            third = x509.load_pem_x509_certificate(home_b.issuing_cert.read_bytes())
            assert key_id(third) == third_id
            # B serves and trusts every live issuer: /cacerts, chain.pem, each one's CRL.
            live = {key_id(first), second_id, third_id}
            assert issuing_ids(cacerts(b)) == live
            assert _chain_issuers(home_b) == live
            for issuer in (second, third):
                crl = crl_at(b, f"/crl/{key_id(issuer)}")
                assert crl.is_signature_valid(issuer.public_key())
            assert crl_at(b, "/crl").is_signature_valid(first.public_key())
            # B's OCSP answers for certificates of the old and the new issuers alike.
            good = ocsp.OCSPCertStatus.GOOD
            assert _ocsp_status(b, old_cert, first) is good
            assert _ocsp_status(b, cert, second) is good
            assert _ocsp_status(b, newest, third) is good
            # Its TLS server certificate is now under the current issuer.
            served = x509.load_pem_x509_certificates(home_b.server_cert.read_bytes())
            assert aki(served[0]) == third_id
            assert _metric(b, "fleetpki_ca_state_generation") == "2"
            assert _metric(b, "fleetpki_ca_state_adopt_failing") == "0"

            # 3. A's home revokes the second issuer: B stops trusting and serving it, its
            # certificates are revoked, the root CRL B serves lists it.
            revoked = _ca("revoke-issuing", second_id, "--home", str(home_a.root))
            assert revoked["devices"] == by_second

            def dropped() -> bool | None:
                return second_id not in issuing_ids(cacerts(b)) or None

            _within("node B drops the revoked issuing CA", dropped)
            root_crl = crl_at(b, "/root.crl")
            assert root_crl.get_revoked_certificate_by_serial_number(second.serial_number)
            assert _chain_issuers(home_b) == {key_id(first), third_id}
            assert request(b.http_url + f"/crl/{second_id}", None).status == 404
            record = a.registry.get_certificate(cert.serial_number)
            assert record is not None and record.status.value == "revoked"
            assert aki(_issued(b, "ca-dev-4")) == third_id

            # 4. A's home rolls the root over: B serves the new root and the cross-certificates
            # (/cacerts), and its TLS server certificate chains to the new root too.
            rolled = runner.invoke(app, ["ca", "rollover-root", "--home", str(home_a.root)])
            assert rolled.exit_code == 0, rolled.output
            wanted = x509.load_pem_x509_certificates(
                home_a.root_cert.read_bytes() + home_a.root_update.read_bytes()
            )

            def new_roots() -> bool | None:
                try:  # B's client context trusts B's root.pem: the new root once adopted
                    return all(c in cacerts(b) for c in wanted) or None
                except (ssl.SSLError, OSError):
                    return None

            _within("node B serves the new root and cross-certificates", new_roots)
            assert home_b.root_cert.read_bytes() == home_a.root_cert.read_bytes()
            assert _metric(b, "fleetpki_ca_state_generation") == "4"
        finally:
            node.stop()
    finally:
        a.stop()


def test_a_node_that_cannot_adopt_keeps_serving_and_says_so(tmp_path: Path, pg_url: str) -> None:
    """Node B's passphrase is not the CA's: it cannot decrypt the new issuing key, so it keeps
    its issuer, logs why, and /metrics says so; the current issuer stays as it was."""
    home_a, home_b = _two_homes(tmp_path, pg_url)
    before = home_b.issuing_cert.read_bytes()
    # B's keys re-encrypted under a passphrase of its own: A's new key is not for B to read.
    phrase = home_b.passphrase_file.read_bytes().strip()
    for path in (home_b.issuing_key, home_b.root_key):
        key = load_private_key_pem(path.read_bytes(), phrase)
        path.write_bytes(private_key_pem(key, b"node B's own passphrase"))
    home_b.passphrase_file.write_text("node B's own passphrase\n")
    _ca("rollover", "--home", str(home_a.root))
    b = start_live_server(home_b.root)
    try:
        assert home_b.issuing_cert.read_bytes() == before
        assert aki(_issued(b, "ca-stuck-1")) == key_id(x509.load_pem_x509_certificate(before))
        _within(
            "node B reports it cannot adopt",
            lambda: _metric(b, "fleetpki_ca_state_adopt_failing") == "1" or None,
        )
        assert home_generation(home_b) == 0
    finally:
        b.stop()


# kill -9 of `ca rollover` with A's files changed, as it records them in the registry.
AT_RECORD = """
    from enroll_server.registry.ca_state import CaStateStore
    def patch(kill):
        CaStateStore.record_ca_state = lambda *args, **kwargs: kill()
"""
# ... and half way through changing them: issuing.pem is the new CA, chain.pem not yet.
MID_ROLLOVER = """
    from enroll_server.home import issuers
    def patch(kill):
        issuers.write_chain = lambda *args, **kwargs: kill()
"""


@pytest.mark.parametrize("hook", [AT_RECORD, MID_ROLLOVER], ids=["at-record", "mid-rollover"])
def test_a_ca_change_killed_before_it_was_recorded_converges(
    tmp_path: Path, pg_url: str, hook: str
) -> None:
    """kill -9 of `ca rollover` after it changed A's files and before it recorded them (A's
    files rolled over, H/ca/generation.next left, nothing in the registry): the next look at
    A's home (its serve's, or the next CA command's) records them, and B adopts them; an
    adoption cut short is done again. A retirement at A reaches B too."""
    home_a, home_b = _two_homes(tmp_path, pg_url)
    now = datetime.now(UTC)
    old = x509.load_pem_x509_certificate(home_a.issuing_cert.read_bytes())
    killed_at(hook, cli("ca", "rollover", "--home", str(home_a.root)), tmp_path)
    new = x509.load_pem_x509_certificate(home_a.issuing_cert.read_bytes())
    assert new != old and (home_a.ca_dir / PENDING).exists()
    loaded = load_home(home_a.root)
    with Registry.open(loaded.registry) as registry:
        assert registry.ca_state_generation() == 0
        assert follow(home_b, registry, now) is None  # nothing recorded: nothing to adopt
        assert follow(home_a, registry, now) is None  # records A's files, adopts nothing
        assert registry.ca_state_generation() == home_generation(home_a) == 1
        assert not (home_a.ca_dir / PENDING).exists()
        assert follow(home_b, registry, now) == 1
        assert load_home(home_b.root).issuer.cert == new
        assert _chain_issuers(home_b) == {key_id(old), key_id(new)}
        # B killed before it wrote its generation: it adopts again, and its home still loads.
        (home_b.ca_dir / GENERATION).unlink()
        assert follow(home_b, registry, now) == 1
        assert load_home(home_b.root).issuer.cert == new
        # A's serve retires the old issuer (none of its certificates is left): B follows.
        with ca_change(home_a, registry, now):
            retired = retire_expired(
                home_a, loaded.config, new, lambda kid: None, lambda kid: None, now
            )
        assert retired == [key_id(old)]
        assert follow(home_b, registry, now) == 2
        assert not list(IssuerFiles(home_b).previous_dir.iterdir())
        assert (IssuerFiles(home_b).retired_dir / f"{key_id(old)}.pem").exists()
        assert _chain_issuers(home_b) == _chain_issuers(home_a) == {key_id(new)}
