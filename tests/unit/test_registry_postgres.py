"""The PostgreSQL backend's own edges: schema versions, logins, outages, redaction.

Everything the two backends share runs in test_registry*.py on both (conftest.registry_location).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from enroll_server.registry import Registry, schema
from enroll_server.registry.errors import (
    NoSchema,
    RegistryUnavailable,
    SchemaTooNew,
    SchemaTooOld,
)
from enroll_server.registry.location import (
    REGISTRY_ENV,
    PostgresLocation,
    SqliteLocation,
    choose_location,
    parse_location,
    redact,
)
from enroll_server.registry.schema import LATEST_VERSION, POSTGRES_BASELINE
from fleetpki.identity import DeviceId
from tests.pg_cluster import PASSWORD, PgCluster
from tests.unit.test_registry import NOW


def _sql(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as raw:
        raw.execute(statement)  # type: ignore[arg-type]


def newer_fleetpki(monkeypatch: pytest.MonkeyPatch) -> int:
    """This fleetpki as if it had one more migration (a table `notes`); its version."""
    nxt = schema.LATEST_VERSION + 1
    v_next = schema.Migration(
        nxt, "notes", ("CREATE TABLE notes (id INTEGER)",), ("CREATE TABLE notes (id BIGINT)",)
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, v_next))
    monkeypatch.setattr(schema, "LATEST_VERSION", nxt)
    return nxt


def test_a_database_without_the_schema_is_refused_until_created(pg_url: str) -> None:
    with pytest.raises(NoSchema, match="fleetpki init --registry"):
        Registry.open(pg_url)
    with Registry.open(pg_url, create=True) as reg:
        reg.add_device(DeviceId("pg-1"), now=NOW, actor="op")
    with Registry.open(pg_url) as reg:  # a node: the schema is there, nothing to migrate
        assert reg.get_device(DeviceId("pg-1")) is not None
    with psycopg.connect(pg_url) as raw:
        rows = raw.execute("SELECT version FROM schema_version").fetchall()
    # The baseline at once, then each later migration: one row per version.
    assert rows == [(v,) for v in range(POSTGRES_BASELINE, LATEST_VERSION + 1)]


def test_a_newer_schema_is_refused_and_left_alone(pg_url: str) -> None:
    Registry.open(pg_url, create=True).close()
    _sql(pg_url, f"INSERT INTO schema_version VALUES ({LATEST_VERSION + 1}, 'x')")
    for upgrade in (False, True):
        with pytest.raises(SchemaTooNew, match="upgrade fleetpki"):
            Registry.open(pg_url, upgrade=upgrade)


def test_an_older_schema_is_refused_until_migrated(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry.open(pg_url, create=True).close()
    nxt = newer_fleetpki(monkeypatch)
    with pytest.raises(SchemaTooOld, match="fleetpki registry migrate") as info:
        Registry.open(pg_url)
    assert PASSWORD not in str(info.value)
    Registry.open(pg_url, upgrade=True).close()
    Registry.open(pg_url).close()
    with psycopg.connect(pg_url) as raw:
        assert raw.execute("SELECT max(version) FROM schema_version").fetchone() == (nxt,)
        assert raw.execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_unreachable_server_is_unavailable_with_the_password_redacted(
    pg_cluster: PgCluster,
) -> None:
    dead = pg_cluster.url("postgres").replace(f":{pg_cluster.port}/", ":1/")
    with pytest.raises(RegistryUnavailable) as info:
        Registry.open(dead)
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_wrong_password_is_unavailable_and_never_echoed(pg_url: str) -> None:
    wrong = pg_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(RegistryUnavailable, match="password authentication failed") as info:
        Registry.open(wrong)
    assert "not-the-password" not in str(info.value)


def test_password_from_a_file_or_pgpassword(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry.open(pg_url, create=True).close()
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    secret = tmp_path / "registry.password"
    secret.write_text(PASSWORD + "\n")
    with Registry.open(PostgresLocation(bare, secret)) as reg:
        assert reg.count_devices() == 0
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with Registry.open(bare) as reg:
        assert reg.count_devices() == 0


def test_a_restarted_server_costs_no_call_and_a_lost_transaction_writes_nothing(
    pg_url: str, pg_cluster: PgCluster
) -> None:
    with Registry.open(pg_url, create=True) as reg:
        reg.add_device(DeviceId("before"), now=NOW, actor="op")
        pg_cluster.restart()
        # Outside a transaction a dead connection is replaced and the statement run again.
        reg.add_device(DeviceId("after-restart"), now=NOW, actor="op")
        # Cut off inside a transaction: that transaction fails as a whole, nothing of it stays.
        pid = reg._conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(RegistryUnavailable), reg._write() as conn:
            conn.execute(
                "INSERT INTO devices (id, role, state, created_at, updated_at) "
                "VALUES ('half', 'device', 'provisioned', 'x', 'x')"
            )
            _sql(pg_url, f"SELECT pg_terminate_backend({pid})")
            conn.execute("UPDATE devices SET updated_at = 'y' WHERE id = 'half'")
        assert reg.get_device(DeviceId("half")) is None
        reg.add_device(DeviceId("after-cut"), now=NOW, actor="op")
        names = {d.device_id.value for d in reg.list_devices()}
        assert names == {"before", "after-restart", "after-cut"}


def test_locations_and_redaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact("postgresql://u:s3cret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert parse_location("sqlite:///x/registry.db") == SqliteLocation(Path("/x/registry.db"))
    assert parse_location("postgres://h/db") == PostgresLocation("postgres://h/db")
    with pytest.raises(ValueError, match="expected postgresql"):
        parse_location("mysql://u:pw@h/db")
    default = tmp_path / "registry.db"
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert choose_location(default) == SqliteLocation(default)
    assert choose_location(default, configured="postgresql://c/db").url == "postgresql://c/db"  # type: ignore[union-attr]
    monkeypatch.setenv(REGISTRY_ENV, "postgresql://env/db")
    assert choose_location(default, configured="postgresql://c/db").url == "postgresql://env/db"  # type: ignore[union-attr]
    flagged = choose_location(default, flag="postgresql://flag/db", configured="x")
    assert flagged == PostgresLocation("postgresql://flag/db")


def test_registry_migrate_command_upgrades_a_shared_registry(
    pg_url: str, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from enroll_server.cli.app import app

    Registry.open(pg_url, create=True).close()
    nxt = newer_fleetpki(monkeypatch)
    runner = CliRunner()
    dead = pg_url.replace(f":{pg_cluster.port}/", ":1/")
    down = runner.invoke(app, ["registry", "migrate", "--registry", dead])
    assert down.exit_code == 1 and "unavailable" in down.output and PASSWORD not in down.output
    with pytest.raises(SchemaTooOld):
        Registry.open(pg_url)
    done = runner.invoke(app, ["registry", "migrate", "--registry", pg_url])
    assert done.exit_code == 0, done.output
    assert f"schema version {nxt}" in done.output and PASSWORD not in done.output
    Registry.open(pg_url).close()
