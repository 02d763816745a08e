"""The operator HTTPS API: bearer auth, device listing, revoke/suspend/resume, batches, audit."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.config import ServerConfig
from enroll_server.registry import CertStatus, DeviceState
from fleetpki.identity import DeviceId
from tests.est_client import request
from tests.integration.test_est import EST, enroll, leaf
from tests.live_server import LiveServer, start_live_server


def admin(
    server: LiveServer, method: str, path: str, body: dict | None = None, token: str | None = None
):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token if token is not None else server.admin_token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return request(server.admin_url + path, server.client_ssl(), method, data, headers)


def test_admin_requires_bearer_token(live_server: LiveServer) -> None:
    r = request(live_server.admin_url + "/admin/devices", live_server.client_ssl())
    assert r.status == 401 and "Bearer" in r.text
    # RFC 6750 3: the challenge names the scheme the admin API takes (Bearer, not the EST
    # port's Basic), with error="invalid_token" once a token was presented (3.1).
    assert r.headers["www-authenticate"] == 'Bearer realm="fleetpki admin"'
    r = admin(live_server, "GET", "/admin/devices", token="wrong")
    assert r.status == 401 and r.text == "operator token is not valid\n"
    assert r.headers["www-authenticate"] == ('Bearer realm="fleetpki admin", error="invalid_token"')


def test_admin_api_and_metrics_are_not_on_the_device_facing_est_port(
    live_server: LiveServer,
) -> None:
    bearer = {"Authorization": f"Bearer {live_server.admin_token}"}
    for path in ("/admin/devices", "/admin/audit", "/metrics"):
        r = request(live_server.est_url + path, live_server.client_ssl(), headers=bearer)
        assert r.status == 404, (path, r.status)
    # EST itself and the health check stay there.
    assert request(live_server.est_url + "/healthz", live_server.client_ssl()).status == 200
    assert request(live_server.est_url + EST + "/cacerts", live_server.client_ssl()).status == 200
    # The admin listener speaks TLS with the server certificate (verified against the root,
    # host name 127.0.0.1) and listens on loopback unless told otherwise.
    assert admin(live_server, "GET", "/admin/devices").status == 200
    assert live_server.handle.admin is not None
    host = live_server.handle.admin.addresses[0][0]
    assert host == "127.0.0.1" == ServerConfig().admin_bind


def test_metrics_need_the_admin_token(live_server: LiveServer) -> None:
    url = live_server.admin_url + "/metrics"
    r = request(url, live_server.client_ssl())
    assert r.status == 401 and "Bearer" in r.text
    r = request(url, live_server.client_ssl(), headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert "fleetpki_enrollments_total" in live_server.metrics()


def test_list_show_and_revoke(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-adm")
    cert = leaf(decode_certs_only(enroll(live_server, "dev-adm", token).body))
    r = admin(live_server, "GET", "/admin/devices?state=active")
    assert r.status == 200
    assert [d["device_id"] for d in json.loads(r.body)["devices"]] == ["dev-adm"]
    shown = json.loads(admin(live_server, "GET", "/admin/devices/dev-adm").body)
    assert shown["certificates"][0]["serial"] == f"{cert.serial_number:x}"
    r = admin(live_server, "POST", "/admin/devices/dev-adm/revoke", {"reason": "key-compromise"})
    assert r.status == 200, r.text
    assert json.loads(r.body)["serials"] == [f"{cert.serial_number:x}"]
    rec = live_server.registry.get_certificate(cert.serial_number)
    assert rec is not None and rec.status is CertStatus.REVOKED
    assert rec.revocation_reason == "keyCompromise"
    audit = json.loads(admin(live_server, "GET", "/admin/audit?device=dev-adm").body)["audit"]
    assert any(
        e["action"].startswith("device.revoke") and e["actor"] == "operator:admin" for e in audit
    )


def test_suspend_and_resume(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-sus")
    cert = leaf(decode_certs_only(enroll(live_server, "dev-sus", token).body))
    assert admin(live_server, "POST", "/admin/devices/dev-sus/suspend").status == 200
    dev = live_server.registry.get_device(DeviceId("dev-sus"))
    assert dev is not None and dev.state is DeviceState.SUSPENDED
    assert live_server.registry.get_certificate(cert.serial_number).status is CertStatus.ON_HOLD  # type: ignore[union-attr]
    assert admin(live_server, "POST", "/admin/devices/dev-sus/resume").status == 200
    assert live_server.registry.get_certificate(cert.serial_number).status is CertStatus.ACTIVE  # type: ignore[union-attr]


def test_bad_admin_input(live_server: LiveServer) -> None:
    live_server.mint_device("dev-in")
    r = admin(live_server, "POST", "/admin/devices/dev-in/revoke", {"reason": "because"})
    assert r.status == 400 and "revocation reason" in r.text
    dev = live_server.registry.get_device(DeviceId("dev-in"))
    assert dev is not None and dev.state is DeviceState.PROVISIONED  # nothing changed
    assert admin(live_server, "POST", "/admin/devices/nobody/revoke", {}).status == 404
    assert admin(live_server, "GET", "/admin/devices/bad%20id").status == 400
    r = request(
        live_server.admin_url + "/admin/devices/dev-in/revoke",
        live_server.client_ssl(),
        "POST",
        b"{not json",
        {"Authorization": f"Bearer {live_server.admin_token}", "Content-Type": "application/json"},
    )
    assert r.status == 400 and "JSON" in r.text
    # Every integer query parameter: a 400 naming it, never a 500 (int() or SQLite overflow).
    for path, name in (
        ("/admin/devices?limit=x", "limit"),
        ("/admin/devices?offset=1.5", "offset"),
        ("/admin/devices?limit=-1", "limit"),
        ("/admin/audit?limit=abc", "limit"),
        ("/admin/audit?limit=99999999999999999999999", "limit"),
    ):
        r = admin(live_server, "GET", path)
        assert r.status == 400, (path, r.status, r.text)
        assert f"query parameter {name} must be" in r.text, r.text
    assert admin(live_server, "GET", "/admin/audit?limit=2").status == 200
    assert admin(live_server, "GET", "/admin/devices?state=sleeping").status == 400


def test_create_batch_over_the_api(live_server: LiveServer) -> None:
    r = admin(
        live_server,
        "POST",
        "/admin/batches",
        {"count": 3, "prefix": "api-", "token_ttl": "1d", "batch_id": "lot-7"},
    )
    assert r.status == 201, r.text
    data = json.loads(r.body)
    assert data["batch_id"] == "lot-7" and data["count"] == 3 and data["out_dir"] is None
    tokens = {t["device_id"]: t["token"] for t in data["tokens"]}
    assert len(tokens) == 3 and all(d.startswith("api-") for d in tokens)
    device, token = next(iter(tokens.items()))
    assert enroll(live_server, device, token).status == 200
    listed = json.loads(admin(live_server, "GET", "/admin/batches").body)["batches"]
    assert [b["batch_id"] for b in listed] == ["lot-7"]


def test_create_batch_bad_input_changes_nothing(live_server: LiveServer) -> None:
    cases = [
        ({"count": 0}, 400),
        ({"count": -5}, 400),
        ({"count": "ten"}, 400),
        ({"count": 2, "token_ttl": "soon"}, 400),
        ({"count": 2, "prefix": "bad/prefix-"}, 400),
    ]
    for body, status in cases:
        r = admin(live_server, "POST", "/admin/batches", body)
        assert r.status == status, (body, r.status, r.text)
        assert r.text.count("\n") == 1
    assert live_server.registry.list_batches() == []
    assert live_server.registry.list_devices() == []
    assert (
        admin(live_server, "POST", "/admin/batches", {"count": 1, "batch_id": "dup"}).status == 201
    )
    r = admin(
        live_server, "POST", "/admin/batches", {"count": 1, "batch_id": "dup", "prefix": "other-"}
    )
    assert r.status == 409, r.text
    assert len(live_server.registry.list_devices()) == 1


def test_a_big_batch_over_the_api_does_not_stall_the_server(live_server: LiveServer) -> None:
    """Creating (and revoking) 50,000 devices takes seconds of registry work; it runs off the
    event loop, so enrollments and every other request are answered meanwhile."""
    token = live_server.mint_device("dev-during-batch")
    created: list[tuple[int, float]] = []

    def create() -> None:
        started = time.monotonic()
        r = admin(live_server, "POST", "/admin/batches", {"count": 50_000, "batch_id": "big"})
        created.append((r.status, time.monotonic() - started))

    worker = threading.Thread(target=create)
    worker.start()
    slowest = 0.0
    answered = 0
    enrolled = None
    while worker.is_alive() and answered < 500:
        started = time.monotonic()
        assert request(live_server.est_url + "/healthz", live_server.client_ssl()).status == 200
        slowest = max(slowest, time.monotonic() - started)
        answered += 1
        if enrolled is None:
            enrolled = enroll(live_server, "dev-during-batch", token).status
    worker.join(60)
    ((status, took),) = created
    assert status == 201 and enrolled == 200
    assert answered >= 3, f"the batch took {took:.2f} s"  # the server answered meanwhile
    assert slowest < max(0.5, took / 3), (slowest, took)
    print(f"batch {took:.2f} s; {answered} requests answered meanwhile, slowest {slowest:.3f} s")
    counts = json.loads(admin(live_server, "GET", "/admin/batches").body)["batches"][0]["counts"]
    assert counts["provisioned"] == counts["total"] == 50_000
    # Revoking the whole batch is the other long registry job of the API.
    r = admin(live_server, "POST", "/admin/batches/big/revoke", {"reason": "key-compromise"})
    assert r.status == 200 and json.loads(r.body)["revoked_devices"] == 50_000


def test_a_revoke_waiting_for_the_write_lock_does_not_stall_the_server(
    live_server: LiveServer,
) -> None:
    """Another process holds the registry's write lock: the revocation waits for it off the
    event loop, and everything else is answered meanwhile."""
    live_server.mint_device("dev-wait")
    holder = sqlite3.connect(live_server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    revoked: list[int] = []
    worker = threading.Thread(
        target=lambda: revoked.append(
            admin(
                live_server, "POST", "/admin/devices/dev-wait/revoke", {"reason": "superseded"}
            ).status
        )
    )
    try:
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert request(live_server.est_url + "/healthz", live_server.client_ssl()).status == 200
        assert time.monotonic() - started < 1.0  # not held for the 5 s busy timeout
        assert revoked == []  # still waiting for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    worker.join(15)
    assert revoked == [200]
    device = live_server.registry.get_device(DeviceId("dev-wait"))
    assert device is not None and device.state is DeviceState.REVOKED


def test_a_crl_publisher_waiting_for_the_write_lock_does_not_hold_the_loops_reads(
    live_server: LiveServer,
) -> None:
    """Publishing a CRL bumps the CRL number (a registry write) in a worker thread; while it
    waits for a lock another process holds, the requests on the event loop that read the
    registry are still answered: the publisher has a connection of its own."""
    live_server.mint_device("dev-crl")
    holder = sqlite3.connect(live_server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    publisher = live_server.handle.revocation.publisher
    publishing = threading.Thread(target=lambda: publisher.publish(datetime.now(UTC)))
    try:
        publishing.start()
        time.sleep(0.3)  # the publisher now waits in crl_number_next
        assert publishing.is_alive()
        started = time.monotonic()
        shown = admin(live_server, "GET", "/admin/devices/dev-crl")
        assert shown.status == 200 and json.loads(shown.body)["state"] == "provisioned"
        assert time.monotonic() - started < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    publishing.join(15)
    assert not publishing.is_alive()


def test_batch_routes_without_the_operator_tooling_refuse_and_create_nothing(
    tmp_path: Path,
) -> None:
    """The admin API creates batches and device tokens through the provisioner the wiring
    passes in; a server started without one says so (409) and writes nothing."""
    server = start_live_server(tmp_path / "home", provisioning=False)
    try:
        r = admin(server, "POST", "/admin/batches", {"count": 2, "prefix": "none-"})
        assert r.status == 409, r.text
        assert "without the operator tooling" in r.text
        assert server.registry.list_batches() == []
        server.mint_device("dev-tool")
        r = admin(server, "POST", "/admin/devices/dev-tool/rekey", {})
        assert r.status == 409 and "without the operator tooling" in r.text
    finally:
        server.stop()
