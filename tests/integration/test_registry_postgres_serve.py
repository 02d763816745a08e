"""`fleetpki init|serve` on a PostgreSQL registry: two servers sharing it, outages, bad input.

Real servers on 127.0.0.1:0, real EST clients, the session's throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.est.wire import decode_certs_only
from enroll_server.registry import DeviceState
from fleetpki.identity import DeviceId
from tests.est_client import Reply, request
from tests.integration.test_est import enroll, leaf, race
from tests.live_server import LiveServer, start_live_server
from tests.pg_cluster import PASSWORD, PgCluster


def _bare(url: str) -> str:
    """The URL without its password (what fleetpki.toml may hold)."""
    return url.replace(f":{PASSWORD}@", "@")


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers (one home, so one CA; ports of their own) on one PostgreSQL registry."""
    a = start_live_server(tmp_path / "home", registry=_bare(pg_url), registry_password=PASSWORD)
    try:
        b = start_live_server(tmp_path / "home")
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def test_a_token_spent_at_one_node_is_refused_at_the_other(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_nodes
    assert a.handle.state.registry.shared and b.handle.est_port != a.handle.est_port
    # Minted before either node's token index looks again: both hold it in memory.
    token = a.mint_device("pg-spent")
    for node in (a, b):
        node.handle.state.service.tokens.read_all()  # type: ignore[union-attr]
    assert enroll(a, "pg-spent", token).status == 200
    refused = enroll(b, "pg-spent", token)
    assert refused.status == 401, refused.text
    assert len(b.registry.certificates_of(DeviceId("pg-spent"))) == 1


def test_one_token_raced_at_two_nodes_yields_one_certificate(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_nodes
    token = a.mint_device("pg-race")
    for node in (a, b):
        node.handle.state.service.tokens.read_all()  # type: ignore[union-attr]
    statuses = race(a, "pg-race", token, 8, others=(b,))
    assert statuses.count(200) == 1


def test_postgresql_down_is_503_with_retry_after_and_the_node_recovers_by_itself(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    server = start_live_server(
        tmp_path / "home", registry=_bare(pg_url), registry_password=PASSWORD
    )
    try:
        token = server.mint_device("pg-outage")
        known = x509.load_pem_x509_certificate(
            leaf_pem(enroll(server, "pg-outage-known", server.mint_device("pg-outage-known")))
        )
        ocsp_req = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(known, server.handle.home.issuer.cert, hashes.SHA256())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        pg_cluster.restart()  # under the running server: the next request reconnects
        assert enroll(server, "pg-outage-warmup", "x").status == 401  # a read, on a new connection
        pg_cluster.pg_ctl("stop", "-m", "fast", "-w")
        try:
            started = time.monotonic()
            reply = enroll(server, "pg-outage", token)
            assert reply.status == 503, reply.text
            assert int(reply.headers["retry-after"]) > 0
            assert "registry is unavailable" in reply.text and PASSWORD not in reply.text
            assert time.monotonic() - started < 15
            # OCSP's own way of saying so (RFC 6960 2.3), not internalError.
            answer = request(server.http_url + "/ocsp", None, "POST", ocsp_req, OCSP_HEADERS)
            status = ocsp.load_der_ocsp_response(answer.body).response_status
            assert status is ocsp.OCSPResponseStatus.TRY_LATER
        finally:
            pg_cluster.pg_ctl("start", "-w", "-t", "30", "-l", str(pg_cluster.base / "log"))
        # Nothing was half-written: the token is unspent, the device still waits.
        device = server.registry.get_device(DeviceId("pg-outage"))
        assert device is not None and device.state is DeviceState.PROVISIONED
        assert server.registry.certificates_of(DeviceId("pg-outage")) == []
        assert enroll(server, "pg-outage", token).status == 200
    finally:
        server.stop()


OCSP_HEADERS = {"Content-Type": "application/ocsp-request"}


def leaf_pem(reply: Reply) -> bytes:
    assert reply.status == 200, reply.text
    certs = decode_certs_only(reply.body)
    return leaf(certs).public_bytes(serialization.Encoding.PEM)


def _serve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("PGPASSWORD", None)
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_serve_refuses_an_unreachable_registry_and_another_schema_version(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    runner = CliRunner()
    made = runner.invoke(app, ["init", "--home", str(home), "--registry", _bare(pg_url)])
    assert made.exit_code == 0, made.output
    dead = pg_url.replace(f":{pg_cluster.port}/", ":1/")
    unreachable = _serve(home, "--registry", dead, "--no-broker")
    assert unreachable.returncode == 1, unreachable.stderr
    assert "unavailable" in unreachable.stderr and "127.0.0.1" in unreachable.stderr
    assert PASSWORD not in unreachable.stderr + unreachable.stdout
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("UPDATE schema_version SET version = version + 1")
    newer = _serve(home, "--registry", pg_url, "--no-broker")
    assert newer.returncode == 2, newer.stderr
    assert "newer than the newest this fleetpki knows" in newer.stderr
    assert PASSWORD not in newer.stderr + newer.stdout


def test_init_makes_the_schema_and_keeps_the_password_out_of_fleetpki_toml(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    with_password = runner.invoke(app, ["init", "--home", str(home), "--registry", pg_url])
    assert with_password.exit_code == 2 and "never holds a password" in with_password.output
    assert PASSWORD not in with_password.output and not home.exists()

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    made = runner.invoke(app, ["init", "--home", str(home), "--registry", _bare(pg_url)])
    assert made.exit_code == 0, made.output
    config = (home / "fleetpki.toml").read_text()
    assert f'registry = "{_bare(pg_url)}"' in config and PASSWORD not in config
    assert not (home / "registry.db").exists()
    listed = runner.invoke(app, ["operator", "list", "--home", str(home)])
    assert listed.exit_code == 0 and "admin" in listed.output

    again = runner.invoke(
        app, ["init", "--home", str(tmp_path / "h2"), "--registry", _bare(pg_url)]
    )
    assert again.exit_code == 2 and "already holds a fleetpki registry" in again.output
    assert not (tmp_path / "h2").exists()


def test_concurrent_enrollments_through_two_nodes_are_all_recorded(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    """Group commits from a worker thread on each node (commit_queue's writer), interleaved
    on one registry: every client that got a certificate finds it recorded, once."""
    a, b = two_nodes
    tokens = {f"pg-storm-{i:03d}": a.mint_device(f"pg-storm-{i:03d}") for i in range(60)}
    statuses: dict[str, int] = {}

    def go(device: str, node: LiveServer) -> None:
        statuses[device] = enroll(node, device, tokens[device]).status

    threads = [threading.Thread(target=go, args=(d, (a, b)[i % 2])) for i, d in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(statuses.values()) == {200}, statuses
    for device in tokens:
        assert len(a.registry.certificates_of(DeviceId(device))) == 1


def test_init_with_an_sqlite_file_elsewhere_records_it(tmp_path: Path) -> None:
    runner = CliRunner()
    home, elsewhere = tmp_path / "home", tmp_path / "data" / "fleet.db"
    elsewhere.parent.mkdir()
    made = runner.invoke(app, ["init", "--home", str(home), "--registry", f"sqlite:///{elsewhere}"])
    assert made.exit_code == 0, made.output
    assert f'registry = "sqlite:///{elsewhere}"' in (home / "fleetpki.toml").read_text()
    assert elsewhere.exists() and not (home / "registry.db").exists()
    listed = runner.invoke(app, ["operator", "list", "--home", str(home)])
    assert listed.exit_code == 0 and "admin" in listed.output
