"""Console sessions, CSRF tokens, one-time downloads and the overview's activity chart, with
no server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enroll_server.home.layout import hash_secret
from enroll_server.registry import Operator, OperatorCredential, OperatorRole, Registry
from enroll_server.registry.fleet_view import DeviceQuery
from enroll_server.webconsole import activity
from enroll_server.webconsole.downloads import DOWNLOAD_LIFETIME, DownloadGone, Downloads
from enroll_server.webconsole.sessions import (
    ABSOLUTE_TIMEOUT,
    IDLE_TIMEOUT,
    TOUCH_INTERVAL,
    SessionStore,
    csrf_ok,
)

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
ALICE = Operator("alice", OperatorRole.ADMIN, T0, None)


def creds(token: str, operator: Operator = ALICE) -> list[OperatorCredential]:
    return [OperatorCredential(operator, hash_secret(token))]


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    """Sessions live in the registry: every test runs on SQLite and on PostgreSQL."""
    with Registry.open(registry_location) as registry:
        yield registry


def test_a_session_lives_while_used_and_ends_idle_or_old(reg: Registry) -> None:
    store = SessionStore(reg)
    sid, _ = store.open(ALICE, "tok", T0)
    row = reg.console_session(hash_secret(sid))
    assert row is not None and row.operator_name == "alice"  # only the id's hash is a key
    assert reg.console_session(sid) is None
    found = store.current(sid, creds("tok"), T0 + IDLE_TIMEOUT / 2)
    assert found is not None and found[1] == ALICE
    # Kept alive by use, until the absolute limit.
    at = T0
    while at + IDLE_TIMEOUT / 2 < T0 + ABSOLUTE_TIMEOUT:
        at += IDLE_TIMEOUT / 2
        assert store.current(sid, creds("tok"), at) is not None
    assert store.current(sid, creds("tok"), T0 + ABSOLUTE_TIMEOUT) is None
    sid, _ = store.open(ALICE, "tok", T0)
    assert store.current(sid, creds("tok"), T0 + IDLE_TIMEOUT) is None
    assert len(store) == 0  # an expired session is forgotten, not just refused


def test_another_node_and_a_restart_see_the_session(
    reg: Registry, registry_location: Path | str
) -> None:
    """No sticky sessions: a store on another connection (another node, or this one after a
    restart) answers for a session opened here, and a logout there ends it here."""
    sid, opened = SessionStore(reg).open(ALICE, "tok", T0)
    with Registry.open(registry_location) as other_node:
        found = SessionStore(other_node).current(sid, creds("tok"), T0 + TOUCH_INTERVAL)
        assert found is not None and found[0].csrf == opened.csrf
        SessionStore(other_node).close(sid)
    assert SessionStore(reg).current(sid, creds("tok"), T0) is None


def test_use_is_recorded_so_the_idle_timeout_counts_from_the_last_click(reg: Registry) -> None:
    store = SessionStore(reg)
    sid, _ = store.open(ALICE, "tok", T0)
    late = T0 + IDLE_TIMEOUT - TOUCH_INTERVAL
    assert store.current(sid, creds("tok"), late) is not None
    row = reg.console_session(hash_secret(sid))
    assert row is not None and row.last_seen == late
    assert store.current(sid, creds("tok"), late + IDLE_TIMEOUT / 2) is not None


def test_logout_a_new_token_or_a_removed_operator_ends_the_session(reg: Registry) -> None:
    store = SessionStore(reg)
    sid, _ = store.open(ALICE, "tok", T0)
    store.close(sid)
    assert store.current(sid, creds("tok"), T0) is None
    sid, _ = store.open(ALICE, "tok", T0)
    assert store.current(sid, creds("rotated"), T0) is None  # token rotated
    assert store.current(sid, creds("tok"), T0) is None  # and it stays ended
    sid, _ = store.open(ALICE, "tok", T0)
    bob = Operator("bob", OperatorRole.ADMIN, T0, None)
    assert store.current(sid, creds("tok", bob), T0) is None  # alice removed
    assert store.current("", creds("tok"), T0) is None
    assert store.current(None, creds("tok"), T0) is None


def test_the_role_is_read_at_each_request(reg: Registry) -> None:
    store = SessionStore(reg)
    sid, _ = store.open(ALICE, "tok", T0)
    demoted = Operator("alice", OperatorRole.VIEWER, T0, None)
    found = store.current(sid, creds("tok", demoted), T0)
    assert found is not None and found[1].role is OperatorRole.VIEWER


def test_the_store_is_bounded(reg: Registry) -> None:
    store = SessionStore(reg, max_sessions=3)
    ids = [store.open(ALICE, "tok", T0 + timedelta(seconds=i))[0] for i in range(5)]
    assert len(store) == 3
    assert store.current(ids[0], creds("tok"), T0 + timedelta(seconds=6)) is None
    assert store.current(ids[4], creds("tok"), T0 + timedelta(seconds=6)) is not None


def test_csrf_tokens_belong_to_their_session(reg: Registry) -> None:
    store = SessionStore(reg)
    _, one = store.open(ALICE, "tok", T0)
    _, two = store.open(ALICE, "tok", T0)
    assert csrf_ok(one, one.csrf)
    assert not csrf_ok(one, two.csrf)
    assert not csrf_ok(one, None) and not csrf_ok(one, "") and not csrf_ok(one, "é")


def test_activity_counts_per_hour_and_series() -> None:
    now = T0 + timedelta(minutes=30)
    rows = [
        (now - timedelta(minutes=5), "certificate.issue", '{"supersedes": null}'),
        (now - timedelta(hours=2), "certificate.issue", '{"supersedes": "ab"}'),
        (now - timedelta(hours=2), "device.revoke", "{}"),
        (now - timedelta(hours=30), "device.revoke", "{}"),  # outside the window
        (now, "batch.create", "{}"),  # not charted
    ]
    hours = activity.hourly(rows, {activity.hour_floor(now): 4}, now)
    assert len(hours) == 24 and hours[-1].start == T0
    assert hours[-1].counts == {"enrollments": 1, "renewals": 0, "refusals": 4, "revocations": 0}
    assert hours[-3].counts == {"enrollments": 0, "renewals": 1, "refusals": 0, "revocations": 1}
    chart = activity.chart(hours)
    assert chart.peak == 4 and chart.totals["revocations"] == 1
    tallest = max(chart.bars, key=lambda b: b.height)
    assert (tallest.series, tallest.count, tallest.height) == ("refusals", 4, chart.height - 20)


def test_refusals_are_sampled_from_the_counter() -> None:
    counter = activity.RefusalCounter()
    counter.sample(10, T0)  # the first sample is the baseline: nothing before it is counted
    counter.sample(13, T0 + timedelta(minutes=10))
    counter.sample(15, T0 + timedelta(hours=1))
    assert counter.per_hour() == {T0: 3, T0 + timedelta(hours=1): 2}
    assert activity.refused_total({"rejected_401": 2, "rejected_429": 1, "simpleenroll_ok": 9}) == 3


def test_a_prefix_is_a_range_of_the_primary_key() -> None:
    clause, params = DeviceQuery(prefix="pi-00").where()
    assert "id >= ? AND id < ?" in clause and params == ["pi-00", "pi-00\x7f"]
    assert DeviceQuery().where() == ("role = 'device'", [])


def test_downloads_are_taken_once_by_their_operator_and_expire(tmp_path: Path) -> None:
    downloads = Downloads(tmp_path / "dl")
    folder = downloads.workspace()
    (folder / "token").write_text("secret")
    found = downloads.add_tree(folder, operator_name="alice", filename="x.tar", what="x", now=T0)
    assert not folder.exists() and found.path.exists()
    with pytest.raises(DownloadGone):
        downloads.peek(found.download_id, "bob", T0)  # another operator's is as good as absent
    taken = downloads.take(found.download_id, "alice", T0)
    Downloads.done(taken)
    with pytest.raises(DownloadGone):
        downloads.take(found.download_id, "alice", T0)
    assert not taken.path.exists()
    # Past its lifetime a download is gone, and so is what a crashed process left behind.
    late = downloads.add_tree(
        downloads.workspace(), operator_name="alice", filename="y.tar", what="y", now=T0
    )
    stray = tmp_path / "dl" / "work-crashed"
    stray.mkdir()
    old = (T0 - timedelta(hours=2)).timestamp()
    os.utime(stray, (old, old))
    downloads.expire(T0 + DOWNLOAD_LIFETIME + timedelta(seconds=1))
    assert not late.path.exists() and not stray.exists()
    with pytest.raises(DownloadGone):
        downloads.peek(late.download_id, "alice", T0 + DOWNLOAD_LIFETIME + timedelta(seconds=1))
