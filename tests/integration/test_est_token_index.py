"""`fleetpki serve` checks first-enrollment tokens in memory (TokenIndex), never on its word alone.

Each case enrolls over real TLS against the running server. The registry connection of the
test plays "another process" (the CLI): what it changes behind the index's back must still
be refused by the commit, with the reply the registry read would have given, nothing
recorded and nothing burned.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from enroll_server.enrollment.token_index import TokenIndex
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import hash_secret
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry import DeviceState
from fleetpki.identity import DeviceId
from tests.integration.test_admin_api import admin
from tests.integration.test_est import enroll, leaf, race, snapshot
from tests.live_server import LiveServer
from tests.pki_helpers import issued_record


def token_index(server: LiveServer) -> TokenIndex:
    tokens = server.handle.state.service.tokens
    assert tokens is not None, "fleetpki serve runs with a token index"
    return tokens


def read_now(server: LiveServer) -> TokenIndex:
    """Have the index read what is new, on the server's loop (as its task does)."""
    tokens = token_index(server)

    async def read() -> None:
        tokens.read_all()

    server.call(read())
    return tokens


def token_used(server: LiveServer, device: str) -> bool:
    row = server.registry._conn.execute(
        "SELECT used_at FROM tokens WHERE device_id = ?", (device,)
    ).fetchone()
    return row[0] is not None


def test_enrollment_vouched_by_the_index_is_recorded_and_its_retry_replayed(
    live_server: LiveServer,
) -> None:
    token = live_server.mint_device("dev-idx")
    tokens = read_now(live_server)
    assert "dev-idx" in tokens
    key = generate_key(KeyType.EC_P256)
    first = enroll(live_server, "dev-idx", token, key=key)
    assert first.status == 200, first.body
    assert "dev-idx" not in tokens  # taken: vouched for once
    cert = leaf(decode_certs_only(first.body))
    records = live_server.registry.certificates_of(DeviceId("dev-idx"))
    assert [r.serial for r in records] == [cert.serial_number]
    assert token_used(live_server, "dev-idx")
    # The reply was lost; the device retries with the same token and key: the registry read
    # answers it with the certificate already issued, and issues nothing new.
    again = enroll(live_server, "dev-idx", token, key=key)
    assert again.status == 200, again.body
    assert leaf(decode_certs_only(again.body)).serial_number == cert.serial_number
    assert len(live_server.registry.certificates_of(DeviceId("dev-idx"))) == 1


def test_device_revoked_behind_the_index_is_refused_with_nothing_burned(
    live_server: LiveServer,
) -> None:
    token = live_server.mint_device("dev-rev")
    tokens = read_now(live_server)
    now = datetime.now(UTC)
    live_server.registry.revoke_device(
        DeviceId("dev-rev"), reason="keyCompromise", now=now, actor="another process"
    )
    assert "dev-rev" in tokens  # stale: the index does not watch other processes
    before = snapshot(live_server, "dev-rev")
    r = enroll(live_server, "dev-rev", token)
    assert r.status == 403, r.body
    assert b"revoked" in r.body
    assert snapshot(live_server, "dev-rev") == before == (0, DeviceState.REVOKED.value, [])
    assert not token_used(live_server, "dev-rev")
    assert "dev-rev" not in tokens


def test_token_reissued_behind_the_index(live_server: LiveServer) -> None:
    old = live_server.mint_device("dev-re")
    read_now(live_server)
    now = datetime.now(UTC)
    new = "fresh-token-" + "x" * 20
    live_server.registry.add_token(
        DeviceId("dev-re"), hash_secret(new), now + timedelta(days=1), now
    )
    r = enroll(live_server, "dev-re", old)
    assert r.status == 401, r.body
    assert b"enrollment token used" in r.body
    assert live_server.registry.certificates_of(DeviceId("dev-re")) == []
    ok = enroll(live_server, "dev-re", new)
    assert ok.status == 200, ok.body


def test_index_reads_a_batch_created_while_serving(live_server: LiveServer) -> None:
    tokens = read_now(live_server)
    # Minted after the index's last read, as `fleetpki batch create` in another process.
    minted = {d: live_server.mint_device(d) for d in ("dev-n1", "dev-n2")}
    assert "dev-n1" not in tokens and "dev-n2" not in tokens
    r = enroll(live_server, "dev-n1", minted["dev-n1"])  # through the registry read
    assert r.status == 200, r.body
    deadline = time.monotonic() + 5
    while "dev-n2" not in tokens:
        assert time.monotonic() < deadline, "the index did not read the new tokens"
        time.sleep(0.02)
    r = enroll(live_server, "dev-n2", minted["dev-n2"])
    assert r.status == 200, r.body
    assert "dev-n2" not in tokens


def test_in_process_revocation_drops_the_entry_and_metrics_show_the_index(
    live_server: LiveServer,
) -> None:
    live_server.mint_device("dev-adm")
    tokens = read_now(live_server)
    assert "dev-adm" in tokens
    reply = admin(
        live_server, "POST", "/admin/devices/dev-adm/revoke", {"reason": "key-compromise"}
    )
    assert reply.status == 200
    assert "dev-adm" not in tokens
    metrics = live_server.metrics()
    assert f"fleetpki_token_index_entries {len(tokens)}" in metrics
    assert "fleetpki_token_index_full 0" in metrics


def test_concurrent_use_of_one_token_vouched_for_by_the_index(live_server: LiveServer) -> None:
    """The index vouches once; the other requests read the registry, and the commit lets
    exactly one of them spend the token (RFC 7030 3.2.3 one-time credentials)."""
    token = live_server.mint_device("dev-race-idx")
    assert "dev-race-idx" in read_now(live_server)
    race(live_server, "dev-race-idx", token)
    assert token_used(live_server, "dev-race-idx")
    assert "dev-race-idx" not in token_index(live_server)


def test_a_batch_created_over_the_admin_api_is_read_at_once(live_server: LiveServer) -> None:
    tokens = token_index(live_server)
    r = admin(live_server, "POST", "/admin/batches", {"count": 3, "prefix": "idx-api-"})
    assert r.status == 201, r.body
    minted = {t["device_id"]: t["token"] for t in json.loads(r.body)["tokens"]}
    deadline = time.monotonic() + 5  # the index reads at most once a second
    while not all(d in tokens for d in minted):
        assert time.monotonic() < deadline, "the index did not read the new batch"
        time.sleep(0.02)
    device, token = next(iter(minted.items()))
    assert enroll(live_server, device, token).status == 200
    assert device not in tokens


def test_token_spent_by_another_process_behind_the_index(live_server: LiveServer) -> None:
    """Another enrolling process (a second server on the same registry) spends the token
    while this server's index still holds it. A retry of that very enrollment (same key, its
    reply lost) gets the certificate recorded there, as the registry read would have given
    it; a request with another key hears "enrollment token used". Nothing new is recorded."""
    token = live_server.mint_device("dev-elsewhere")
    assert "dev-elsewhere" in read_now(live_server)
    key = generate_key(KeyType.EC_P256)
    now = datetime.now(UTC)
    there = build_device_certificate(
        key.public_key(),
        DeviceId("dev-elsewhere"),
        live_server.handle.home.issuer,
        now,
        DeviceProfile(),
    )
    live_server.registry.record_issuance(
        issued_record(there, "dev-elsewhere"),
        consume_token_hash=hash_secret(token),
        supersedes_serial=None,
        now=now,
        actor="another server",
    )
    assert "dev-elsewhere" in token_index(live_server)  # stale: spent behind its back
    retry = enroll(live_server, "dev-elsewhere", token, key=key)  # vouched for, refused at commit
    assert retry.status == 200, retry.body
    assert leaf(decode_certs_only(retry.body)).serial_number == there.serial_number
    assert "dev-elsewhere" not in token_index(live_server)
    other = enroll(live_server, "dev-elsewhere", token)  # another key, through the registry read
    assert other.status == 401 and b"enrollment token used" in other.body, other.body
    records = live_server.registry.certificates_of(DeviceId("dev-elsewhere"))
    assert [r.serial for r in records] == [there.serial_number]
