"""The TLS policy of the listeners (tls_policy.py): TLS >= 1.2 and AEAD suites only."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from enroll_server.broker.hardening import server_tls_context
from enroll_server.web.app import server_ssl_context
from tests.live_server import LiveServer, start_live_server

CBC = ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA"]
AEAD = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_live_server(tmp_path_factory.mktemp("tls") / "home")
    yield srv
    srv.stop()


def _tls12_handshake(server: LiveServer, cipher: str) -> str:
    ctx = server.client_ssl()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    with (
        socket.create_connection(("127.0.0.1", server.handle.est_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        negotiated = tls.cipher()
        assert negotiated is not None
        return negotiated[0]


@pytest.mark.parametrize("cipher", AEAD)
def test_est_listener_accepts_aead_suites(server: LiveServer, cipher: str) -> None:
    assert _tls12_handshake(server, cipher) == cipher


@pytest.mark.parametrize("cipher", CBC)
def test_est_listener_refuses_cbc_suites(server: LiveServer, cipher: str) -> None:
    with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"):
        _tls12_handshake(server, cipher)


def test_est_and_broker_contexts_offer_the_same_suites(server: LiveServer) -> None:
    layout = server.layout
    est = server_ssl_context(layout.server_cert, layout.server_key, layout.chain)
    broker = server_tls_context(Path(layout.server_cert), Path(layout.server_key), layout.chain)
    suites = {c["name"] for c in est.get_ciphers()}
    assert suites == {c["name"] for c in broker.get_ciphers()}
    tls12 = {c["name"] for c in est.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all("GCM" in s or "CHACHA20" in s for s in tls12), tls12
    assert est.minimum_version == broker.minimum_version == ssl.TLSVersion.TLSv1_2
