"""The web console over real HTTPS (the admin listener of a real server, with its broker):
login, roles, sessions, CSRF, security headers, escaping, audit, one-time downloads, the
live stream. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import io
import json
import re
import socket
import ssl
import stat
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.cli.app import app as cli_app
from enroll_server.enrollment.operators import add_operator, rotate_operator
from enroll_server.registry import DeviceState, OperatorRole
from fleetpki.identity import DeviceId
from tests.console_client import ConsoleClient, Page
from tests.est_client import enroll_headers, request
from tests.live_server import LiveServer, start_live_server

runner = CliRunner()
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_live_server(tmp_path_factory.mktemp("console") / "home", broker=True)
    try:
        for i in range(30):
            live.mint_device(f"cons-{i:03d}")
        yield live
    finally:
        live.stop()


def operator_token(server: LiveServer, name: str, role: OperatorRole) -> str:
    existing = {o.name for o in server.registry.list_operators()}
    now = datetime.now(UTC)
    if name in existing:
        return rotate_operator(server.registry, name, now, actor="test")
    return add_operator(server.registry, name, role, now, actor="test")


def browser(server: LiveServer) -> ConsoleClient:
    return ConsoleClient(server.admin_url, server.client_ssl())


def logged_in(
    server: LiveServer, name: str, role: OperatorRole = OperatorRole.ADMIN
) -> ConsoleClient:
    client = browser(server)
    page = client.login(operator_token(server, name, role))
    assert page.status == 303 and page.location == "/console/", page.text[:500]
    return client


def state_of(server: LiveServer, device: str) -> DeviceState:
    found = server.registry.get_device(DeviceId(device))
    assert found is not None
    return found.state


PAGES = [
    "/console/",
    "/console/devices",
    "/console/devices/cons-001",
    "/console/batches",
    "/console/services",
    "/console/audit",
    "/console/events",
]
POSTS = [
    "/console/devices/cons-001/revoke",
    "/console/devices/cons-001/suspend",
    "/console/devices/cons-001/token",
    "/console/batches",
    "/console/services",
]


def test_no_page_and_no_action_without_a_login(server: LiveServer) -> None:
    anonymous = browser(server)
    for path in PAGES:
        page = anonymous.get(path)
        assert (page.status, page.location) == (303, "/console/login"), path
    for path in POSTS:
        page = anonymous.post(path, {"csrf": "x", "reason": "unspecified", "count": "1"})
        assert page.status == 401, path
    assert state_of(server, "cons-001") is DeviceState.PROVISIONED
    # A cookie the server never issued is no session.
    anonymous.jar.set_cookie(_cookie("fleetpki_console", "forged-session-id"))
    assert anonymous.get("/console/").status == 303


def _cookie(name: str, value: str) -> object:
    import http.cookiejar

    return http.cookiejar.Cookie(
        0, name, value, None, False, "127.0.0.1", False, False, "/console", True, True, None,
        False, None, None, {},
    )  # fmt: skip


def test_login_with_an_operator_token_and_the_session_cookie(server: LiveServer) -> None:
    client = browser(server)
    assert client.login("not-a-token").status == 401
    page = client.login(operator_token(server, "olga", OperatorRole.ADMIN))
    assert page.status == 303
    cookie_header = next(
        h for h in page.headers.get_all("Set-Cookie") or [] if h.startswith("fleetpki_console=")
    )
    flags = {part.strip().split("=")[0].lower() for part in cookie_header.split(";")}
    assert {"httponly", "secure", "max-age", "path"} <= flags
    assert "samesite=strict" in cookie_header.lower()
    overview = client.get("/console/")
    assert overview.status == 200 and "olga (admin)" in overview.text
    # The session id is never the token, and it is not kept in clear by the server.
    session_id = client.cookie("fleetpki_console")
    assert session_id is not None and session_id.value not in overview.text


def test_the_admin_token_keeps_working_for_the_api_and_logs_in(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    reply = request(
        server.admin_url + "/admin/devices?limit=1", server.client_ssl(), headers=headers
    )
    assert reply.status == 200 and json.loads(reply.text)["devices"]
    client = browser(server)
    assert client.login(server.admin_token).status == 303
    assert "admin (admin)" in client.get("/console/").text


def test_logout_ends_the_session_on_the_server(server: LiveServer) -> None:
    client = logged_in(server, "lena")
    stolen = client.cookie("fleetpki_console")
    assert stolen is not None
    assert client.post("/console/logout", {"csrf": client.csrf()}).status == 303
    replay = browser(server)
    replay.jar.set_cookie(stolen)  # the old cookie, kept by an attacker
    assert replay.get("/console/").status == 303
    assert replay.post("/console/devices/cons-002/suspend", {"csrf": "x"}).status == 401


def test_a_rotated_token_ends_its_sessions(server: LiveServer) -> None:
    client = logged_in(server, "rita")
    assert client.get("/console/").status == 200
    rotate_operator(server.registry, "rita", datetime.now(UTC), actor="test")
    assert client.get("/console/").status == 303


def test_a_post_without_its_csrf_token_is_refused(server: LiveServer) -> None:
    client = logged_in(server, "carl")
    for fields in ({"reason": "unspecified"}, {"reason": "unspecified", "csrf": "guess"}):
        page = client.post("/console/devices/cons-003/revoke", fields)
        assert page.status == 403 and "CSRF" in page.text
    other = logged_in(server, "cora")  # another session's token is no good either
    page = client.post("/console/devices/cons-003/revoke", {"csrf": other.csrf()})
    assert page.status == 403
    assert state_of(server, "cons-003") is DeviceState.PROVISIONED
    # And a GET never changes anything: the action URLs do not answer it.
    assert client.get("/console/devices/cons-003/revoke").status == 405
    assert state_of(server, "cons-003") is DeviceState.PROVISIONED


def test_a_viewer_sees_no_action_and_its_forged_posts_are_refused(server: LiveServer) -> None:
    viewer = logged_in(server, "vera", OperatorRole.VIEWER)
    for path in ("/console/", "/console/devices/cons-004", "/console/batches", "/console/services"):
        page = viewer.get(path)
        assert page.status == 200
        forms = page.text.count('method="post"')
        assert forms == 1, f"{path}: only the logout form, found {forms}"  # logout
    csrf = viewer.csrf()  # the viewer's own, valid token: still read only
    for path, fields in (
        ("/console/devices/cons-004/revoke", {"reason": "key-compromise"}),
        ("/console/devices/cons-004/suspend", {}),
        ("/console/devices/cons-004/token", {"purpose": "reissue"}),
        ("/console/batches", {"count": "2"}),
        ("/console/services", {"name": "viewer-svc"}),
    ):
        page = viewer.post(path, {"csrf": csrf, **fields})
        assert page.status == 403 and "read only" in page.text, path
    assert state_of(server, "cons-004") is DeviceState.PROVISIONED
    assert server.registry.get_device(DeviceId("viewer-svc")) is None


SECURITY = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def _check_headers(page: Page, where: str) -> None:
    for name, value in SECURITY.items():
        assert page.headers.get(name) == value, (where, name)
    csp = page.headers.get("Content-Security-Policy") or ""
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["script-src"] == ["'self'"], where
    assert directives["frame-ancestors"] == ["'none'"], where
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, where


def test_every_response_carries_the_security_headers(server: LiveServer) -> None:
    anonymous = browser(server)
    _check_headers(anonymous.get("/console/login"), "login")
    _check_headers(anonymous.post("/console/devices/cons-001/suspend", {}), "401")
    client = logged_in(server, "hugo")
    for path in [*PAGES[:-1], "/console/devices/no-such-device", "/console/static/console.js"]:
        _check_headers(client.get(path), path)
    _check_headers(client.post("/console/devices/cons-001/suspend", {}), "403")
    # No inline script anywhere: every <script> has a src served by the console itself.
    page = client.get("/console/").text
    assert '<script src="/console/static/console.js"' in page
    assert page.count("<script") == 1


def test_stored_and_echoed_strings_are_text(server: LiveServer) -> None:
    client = logged_in(server, "xena")
    # A revocation reason that is markup: refused, and echoed as text.
    page = client.submit("/console/devices/cons-005/revoke", {"reason": XSS})
    assert page.status == 400
    assert "<script>alert" not in page.text and "&lt;script&gt;alert" in page.text
    # A batch note (stored) and a search (echoed).
    job = client.submit("/console/batches", {"count": "1", "prefix": "xss-", "note": XSS})
    assert job.status == 303
    batch_id = _finished_job(client, job.location or "")
    for path in (f"/console/batches/{batch_id}", "/console/batches", f"/console/devices?q={XSS}"):
        text = client.get(path.replace(" ", "%20").replace('"', "%22")).text
        assert "<script>alert" not in text and "<img src=x" not in text, path
    assert "&lt;script&gt;" in client.get(f"/console/batches/{batch_id}").text


def _finished_job(client: ConsoleClient, job_path: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = client.get(job_path)
        assert page.status == 200
        if 'id="job-done"' in page.text:
            start = page.text.index("/console/batches/lot-")
            return page.text[start + len("/console/batches/") :].split('"')[0]
        assert 'id="job-error"' not in page.text, page.text
        time.sleep(0.2)
    raise AssertionError("the batch job did not finish in 30 s")


def test_console_actions_are_audited_as_the_cli_audits_them(
    server: LiveServer, tmp_path: Path
) -> None:
    client = logged_in(server, "alice")
    page = client.submit("/console/devices/cons-006/revoke", {"reason": "key-compromise"})
    assert page.status == 303
    code = runner.invoke(
        cli_app,
        [
            "device",
            "revoke",
            "cons-007",
            "--reason",
            "key-compromise",
            "--home",
            str(server.layout.root),
        ],
    ).exit_code
    assert code == 0
    console_entry = server.registry.audit_log(device_id=DeviceId("cons-006"), limit=1)[0]
    cli_entry = server.registry.audit_log(device_id=DeviceId("cons-007"), limit=1)[0]
    assert console_entry.actor == "operator:alice"  # the operator, by name, as the admin API
    assert (console_entry.action, console_entry.detail) == (cli_entry.action, cli_entry.detail)
    assert state_of(server, "cons-006") is DeviceState.REVOKED
    # Suspend and resume too, each an entry with the operator's name.
    client.submit("/console/devices/cons-008/suspend", {})
    client.submit("/console/devices/cons-008/resume", {})
    actions = [
        (e.actor, e.action)
        for e in server.registry.audit_log(device_id=DeviceId("cons-008"), limit=2)
    ]
    assert actions == [("operator:alice", "device.resume"), ("operator:alice", "device.suspend")]


def test_a_reissued_token_is_shown_once_and_enrolls(server: LiveServer) -> None:
    client = logged_in(server, "tara")
    page = client.submit("/console/devices/cons-009/token", {"purpose": "reissue"})
    assert page.status == 200 and 'id="token-value"' in page.text
    token = page.text.split('id="token-value">')[1].split("<")[0]
    assert len(token) >= 40 and token not in client.get("/console/devices/cons-009").text
    entry = server.registry.audit_log(device_id=DeviceId("cons-009"), limit=1)[0]
    assert (entry.actor, entry.action) == ("operator:tara", "token.issue")


def test_login_is_throttled_after_failures(server: LiveServer) -> None:
    client = browser(server)
    # Five failures a minute per source address (earlier tests of this module failed once).
    statuses = [client.login(f"wrong-{i}").status for i in range(6)]
    assert statuses[0] == 401 and 429 in statuses, statuses
    assert set(statuses[statuses.index(429) :]) == {429}, statuses
    page = client.login("wrong-again")
    assert page.status == 429 and int(page.headers["Retry-After"]) >= 1
    # The throttle never refuses a correct token (as the enrollment throttle).
    assert client.login(operator_token(server, "tim", OperatorRole.ADMIN)).status == 303


def test_batch_bundles_and_service_keys_are_one_time_downloads(server: LiveServer) -> None:
    client = logged_in(server, "bob")
    job = client.submit("/console/batches", {"count": "3", "prefix": "dl-", "token_ttl": "2d"})
    batch_id = _finished_job(client, job.location or "")
    done = client.get(job.location or "").text
    download_path = done.split('id="to-download"')[0].rsplit('href="', 1)[1].split('"')[0]
    assert client.get(download_path).status == 200
    other = logged_in(server, "bea")  # another operator cannot take it
    assert other.post(download_path, {"csrf": other.csrf()}).status == 410
    tar_reply = client.submit(download_path, {})
    assert tar_reply.status == 200
    assert tar_reply.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar_reply.body)) as tar:
        names = tar.getnames()
        token_info = tar.getmember("dl-000001/token")
        assert stat.S_IMODE(token_info.mode) == 0o600
    assert {"manifest.csv", "dl-000001/agent.toml", "dl-000001/ca.pem", "dl-000003/token"} <= set(
        names
    )
    assert client.submit(download_path, {}).status == 410  # once
    assert server.registry.get_batch(batch_id) is not None
    download_id = download_path.rsplit("/", 1)[1]
    leftover = server.layout.root / "console-downloads" / f"{download_id}.tar"
    assert not leftover.exists()  # nothing of it is left on the server
    assert not [p for p in leftover.parent.iterdir() if p.is_dir()]  # nor its work folder
    manifest = client.get(f"/console/batches/{batch_id}/manifest.csv")
    assert manifest.status == 200 and "dl-000002" in manifest.text
    # A service: key and certificate, once.
    page = client.submit("/console/services", {"name": "billing"})
    assert page.status == 303 and (page.location or "").startswith("/console/downloads/")
    tar_reply = client.submit(page.location or "", {})
    with tarfile.open(fileobj=io.BytesIO(tar_reply.body)) as tar:
        assert {"key.pem", "cert.pem", "ca.pem"} <= set(tar.getnames())
        assert stat.S_IMODE(tar.getmember("key.pem").mode) == 0o600
    entry = server.registry.audit_log(device_id=DeviceId("billing"), limit=5)
    assert {e.actor for e in entry} == {"operator:bob"}
    assert client.submit("/console/services/billing/revoke", {}).status == 303
    assert state_of(server, "billing") is DeviceState.REVOKED


def test_a_batch_is_revoked_only_with_its_id_typed(server: LiveServer) -> None:
    client = logged_in(server, "bert")
    batch_id = _finished_job(
        client, client.submit("/console/batches", {"count": "2", "prefix": "rv-"}).location or ""
    )
    page = client.submit(f"/console/batches/{batch_id}/revoke", {"confirm": "yes"})
    assert page.status == 400 and state_of(server, "rv-000001") is DeviceState.PROVISIONED
    page = client.submit(f"/console/batches/{batch_id}/revoke", {"confirm": batch_id})
    assert page.status == 200 and "revoked 2 devices" in page.text
    assert state_of(server, "rv-000002") is DeviceState.REVOKED


def test_devices_search_by_prefix_filter_and_pages(server: LiveServer) -> None:
    client = logged_in(server, "dora")
    page = client.get("/console/devices?q=cons-01").text
    assert 'id="total">10 devices' in page and "cons-019" in page and "cons-020" not in page
    page = client.get("/console/devices?q=cons-&order=desc").text
    assert page.index("cons-029") < page.index("cons-028")
    page = client.get("/console/devices?state=revoked").text
    assert "cons-006" in page and "cons-010" not in page
    assert "30 devices, page 1 of 1" in client.get("/console/devices?q=cons-&page=1").text


def _read_events(server: LiveServer, cookie: str, since: int, until: float) -> str:
    """The raw event stream for a while, read over TLS by hand (no client buffers it)."""
    ctx = server.client_ssl()
    host, port = "127.0.0.1", server.handle.admin_port
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            f"GET /console/events?since={since} HTTP/1.1\r\nHost: localhost\r\n"
            f"Cookie: fleetpki_console={cookie}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        data = b""
        tls.settimeout(0.5)
        while time.monotonic() < until:
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLError):
                continue
            if not chunk:
                break
            data += chunk
            if b"device.revoke" in data and b"event: fleet" in data:
                break
        return data.decode("utf-8", "replace")


def test_the_live_stream_sends_new_audit_entries_and_fleet_counts(server: LiveServer) -> None:
    client = logged_in(server, "sam")
    cookie = client.cookie("fleetpki_console")
    assert cookie is not None and cookie.value is not None
    since = server.registry.last_audit_seq()
    # A refused enrollment (a wrong token): not in the registry, counted by the process.
    refused = request(
        server.est_url + "/.well-known/est/simpleenroll",
        server.client_ssl(),
        "POST",
        b"MIIB",
        enroll_headers("cons-012", "not-the-token"),
    )
    assert refused.status == 401
    # A revocation by another door (the CLI's registry call) after the page was rendered.
    server.registry.revoke_device(
        DeviceId("cons-011"), reason="keyCompromise", now=datetime.now(UTC), actor="cli"
    )
    text = _read_events(server, cookie.value, since, time.monotonic() + 10)
    assert "text/event-stream" in text
    assert "event: audit" in text and '"device_id":"cons-011"' in text
    assert "event: fleet" in text and '"revoked":' in text
    assert re.search(r'"refused":[1-9]', text), text
    assert re.search(r'id="count-refused">[1-9]', client.get("/console/").text)
