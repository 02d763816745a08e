"""`fleetpki registry copy`: a whole fleet from SQLite into PostgreSQL (and back), verified."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.registry import OperatorRole, Registry
from enroll_server.registry.copy import TABLES, table_sums
from fleetpki.identity import DeviceId
from tests.pg_cluster import PASSWORD
from tests.pki_helpers import MemoryCa
from tests.unit.test_registry import NOW, TTL, enroll, issued, new_devices, token_hash


def _fleet(path: Path, ca: MemoryCa) -> None:
    """A registry with a row in every table: a batch, enrollments, a renewal, a revocation,
    a suspension, an operator, a CRL number, a CA state."""
    with Registry.open(path) as reg:
        reg.create_batch(
            "lot", new_devices("lot", 30), kind="token", token_ttl=TTL, now=NOW, actor="op"
        )
        for name in ("cam-1", "cam-2", "cam-3"):
            enroll(reg, ca, name)
        old = reg.certificates_of(DeviceId("cam-1"))[0]
        renewal = issued(ca, "cam-1", now=NOW + timedelta(days=1))
        reg.record_issuance(
            renewal,
            consume_token_hash=None,
            supersedes_serial=old.serial,
            now=NOW + timedelta(days=1),
            actor="est",
        )
        reg.revoke_device(DeviceId("cam-2"), reason="keyCompromise", now=NOW, actor="op")
        reg.suspend_device(DeviceId("cam-3"), now=NOW, actor="op")
        reg.add_operator("alice", OperatorRole.ADMIN, token_hash("alice"), NOW, actor="cli")
        reg.crl_number_next()
        reg.crl_number_next()
        reg.record_ca_state(1, '{"files": {}}', NOW)  # what a node of a shared registry records


def test_copy_moves_every_table_and_the_copy_works_on(
    tmp_path: Path, pg_url: str, ca: MemoryCa
) -> None:
    source = tmp_path / "registry.db"
    _fleet(source, ca)
    result = CliRunner().invoke(
        app, ["registry", "copy", "--from", f"sqlite:///{source}", "--to", pg_url]
    )
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert "verified events" in result.output
    with Registry.open(source) as src, Registry.open(pg_url) as dst:
        sums = table_sums(src)
        assert sums == table_sums(dst)
        assert all(s.rows for s in sums), sums  # every table had something to copy
        # The copy is a working registry: a waiting token enrolls, sequences go on.
        last_seq = dst.last_event_seq()
        assert last_seq == src.last_event_seq()
        cert = issued(ca, "lot-000007")
        dst.record_issuance(
            cert,
            consume_token_hash=token_hash("token-lot-000007"),
            supersedes_serial=None,
            now=NOW,
            actor="est",
        )
        dst.revoke_device(DeviceId("lot-000007"), reason="keyCompromise", now=NOW, actor="op")
        assert [e.seq for e in dst.events_since(last_seq)] == [last_seq + 1]
        assert dst.crl_number_next() == 3
        assert dst.audit_log(limit=1)[0].action == "device.revoke"
        assert dst.max_token_rowid() == src.max_token_rowid()


def test_copy_refuses_a_target_that_is_not_empty(tmp_path: Path, pg_url: str, ca: MemoryCa) -> None:
    source = tmp_path / "registry.db"
    _fleet(source, ca)
    with Registry.open(pg_url, create=True) as dst:
        dst.add_device(DeviceId("already-here"), now=NOW, actor="op")
        before = table_sums(dst)
    result = CliRunner().invoke(
        app, ["registry", "copy", "--from", f"sqlite:///{source}", "--to", pg_url]
    )
    assert result.exit_code == 2 and "is not empty" in result.output, result.output
    with Registry.open(pg_url) as dst:
        assert table_sums(dst) == before


def test_copy_back_to_sqlite_round_trips(tmp_path: Path, pg_url: str, ca: MemoryCa) -> None:
    source = tmp_path / "registry.db"
    _fleet(source, ca)
    back = tmp_path / "back.db"
    runner = CliRunner()
    there = runner.invoke(app, ["registry", "copy", "--from", str(source), "--to", pg_url])
    assert there.exit_code == 0, there.output
    home = runner.invoke(app, ["registry", "copy", "--from", pg_url, "--to", f"sqlite:///{back}"])
    assert home.exit_code == 0, home.output
    with Registry.open(source) as a, Registry.open(back) as b:
        assert table_sums(a) == table_sums(b)


def test_copy_names_every_column_of_every_table(tmp_path: Path) -> None:
    """A migration that adds a column or table must teach the copy about it."""
    path = tmp_path / "r.db"
    Registry.open(path).close()
    with closing(sqlite3.connect(path)) as raw:
        tables = {
            r[0]
            for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")
        }
        copied = {t for t, _, _ in TABLES}
        assert tables - copied == {"schema_version", "console_sessions"}
        for table, _, columns in TABLES:
            names = [r[1] for r in raw.execute(f"PRAGMA table_info({table})")]
            assert set(columns) - {"rowid"} == set(names), table


def test_copy_refuses_bad_locations(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        app, ["registry", "copy", "--from", str(tmp_path / "nope.db"), "--to", "postgresql://h/d"]
    )
    assert missing.exit_code == 2 and "no such file" in missing.output
    bad = runner.invoke(
        app, ["registry", "copy", "--from", "mysql://u:pw@h/d", "--to", "postgresql://h/d"]
    )
    assert bad.exit_code == 2 and "expected postgresql" in bad.output and "pw" not in bad.output
