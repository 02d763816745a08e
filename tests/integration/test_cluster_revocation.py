"""Two `fleetpki serve` nodes on one PostgreSQL registry: a revocation made through node A
reaches node B's embedded broker, CRL and OCSP (issue: any request may go to any node).

Real servers on 127.0.0.1:0, a real MQTT client (paho) over mutual TLS, the session's
throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from paho.mqtt.enums import CallbackAPIVersion

from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key
from tests.est_client import request
from tests.integration.test_admin_api import admin
from tests.integration.test_est import enroll, leaf
from tests.live_server import LiveServer, start_live_server
from tests.pg_cluster import PASSWORD

OCSP_HEADERS = {"Content-Type": "application/ocsp-request"}


@pytest.fixture
def two_brokers(tmp_path: Path, pg_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two nodes, each with its embedded broker, one home (one CA), one PostgreSQL registry."""
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    a = start_live_server(tmp_path / "home", registry=bare, registry_password=PASSWORD, broker=True)
    try:
        b = start_live_server(tmp_path / "home", broker=True)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _enrolled(node: LiveServer, device: str, folder: Path) -> tuple[x509.Certificate, Path, Path]:
    key = generate_key(KeyType.EC_P256)
    reply = enroll(node, device, node.mint_device(device), key)
    assert reply.status == 200, reply.text
    cert = leaf(decode_certs_only(reply.body))
    cert_path, key_path = folder / f"{device}.pem", folder / f"{device}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, cert_path, key_path


class Session:
    """A device's MQTT session on one node's broker; `dropped_at` is when the broker ended it."""

    def __init__(self, node: LiveServer, device: str, cert: Path, key: Path) -> None:
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.dropped_at = 0.0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
        ctx = node.client_ssl(cert, key)
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(60, 120)  # no reconnect within the test
        self.refused = threading.Event()
        self.client.on_connect = self._connack
        self.client.on_disconnect = lambda *a: self._dropped()
        self.client.connect_async("127.0.0.1", node.mqtt_port, keepalive=60)
        self.client.loop_start()

    def _connack(
        self, client: object, userdata: object, flags: object, rc: Any, props: object
    ) -> None:
        (self.refused if rc.is_failure else self.connected).set()

    def _dropped(self) -> None:
        self.dropped_at = time.monotonic()
        self.dropped.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _ocsp_status(node: LiveServer, cert: x509.Certificate) -> ocsp.OCSPCertStatus:
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, node.handle.home.issuer.cert, hashes.SHA256())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    answer = request(node.http_url + "/ocsp", None, "POST", req, OCSP_HEADERS)
    response = ocsp.load_der_ocsp_response(answer.body)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificate_status


def _listed_within(node: LiveServer, cert: x509.Certificate, deadline: float) -> bool:
    while True:
        crl = x509.load_der_x509_crl(request(node.http_url + "/crl", None).body)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_revoke_through_node_a_drops_the_session_on_node_b_within_a_second(
    two_brokers: tuple[LiveServer, LiveServer], tmp_path: Path
) -> None:
    a, b = two_brokers
    cert, cert_path, key_path = _enrolled(a, "pg-x-1", tmp_path)
    bystander_cert, bystander_path, bystander_key = _enrolled(b, "pg-x-2", tmp_path)
    session = Session(b, "pg-x-1", cert_path, key_path)
    bystander = Session(b, "pg-x-2", bystander_path, bystander_key)
    try:
        assert session.connected.wait(10) and bystander.connected.wait(10)
        assert _ocsp_status(b, cert) is ocsp.OCSPCertStatus.GOOD
        revoked_at = time.monotonic()
        reply = admin(a, "POST", "/admin/devices/pg-x-1/revoke", {"reason": "key-compromise"})
        assert reply.status == 200, reply.text
        assert session.dropped.wait(5), "node B's broker kept the revoked device's session"
        assert session.dropped_at - revoked_at < 1.0
        # Node B heard of it through PostgreSQL's NOTIFY, not only its next poll.
        assert b.handle.event_listener is not None and b.handle.event_listener.notifications
        # Node B's OCSP says so at once, its CRL (re-signed in the background) within 1 s.
        assert _ocsp_status(b, cert) is ocsp.OCSPCertStatus.REVOKED
        assert _listed_within(b, cert, revoked_at + 1.0)
        assert not bystander.dropped.is_set() and bystander.client.is_connected()
        assert _ocsp_status(b, bystander_cert) is ocsp.OCSPCertStatus.GOOD
        # Refused at reconnect, on node B as on node A.
        again = Session(b, "pg-x-1", cert_path, key_path)
        try:
            assert again.refused.wait(5) or again.dropped.wait(5)
            assert not again.connected.is_set()
        finally:
            again.close()
    finally:
        session.close()
        bystander.close()


def test_a_node_that_lost_its_listen_connection_catches_up(
    two_brokers: tuple[LiveServer, LiveServer], tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL drops node B's LISTEN connection (a restart, a failover, an operator): B
    listens again by itself, and a revocation made through A still reaches B's broker."""
    a, b = two_brokers
    listener = b.handle.event_listener
    assert listener is not None
    with psycopg.connect(pg_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
        ).fetchall()
    assert len(killed) == 2  # one per node
    deadline = time.monotonic() + 10
    while listener.reconnects < 1:
        assert time.monotonic() < deadline, "node B never listened again"
        time.sleep(0.05)
    cert, cert_path, key_path = _enrolled(a, "pg-x-3", tmp_path)
    session = Session(b, "pg-x-3", cert_path, key_path)
    try:
        assert session.connected.wait(10)
        before = listener.notifications
        revoked_at = time.monotonic()
        reply = admin(a, "POST", "/admin/devices/pg-x-3/revoke", {"reason": "superseded"})
        assert reply.status == 200, reply.text
        assert session.dropped.wait(5) and session.dropped_at - revoked_at < 1.0
        assert listener.notifications > before
        assert _listed_within(b, cert, revoked_at + 1.0)
    finally:
        session.close()
