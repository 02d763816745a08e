"""`fleetpki backup` / `fleetpki restore`: the restored system enrolls; bad files write nothing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from enroll_server.cli.app import app
from fleetpki.identity import DeviceId
from tests.integration.test_est import enroll
from tests.live_server import LiveServer, start_live_server
from tests.pg_cluster import PASSWORD, PgCluster


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _round_trip(server: LiveServer, tmp_path: Path, *restore_args: str) -> LiveServer:
    """Enroll one device, keep a second one's token unspent, back up while serving, restore."""
    assert enroll(server, "bk-1", server.mint_device("bk-1")).status == 200
    unspent = server.mint_device("bk-2")
    archive = tmp_path / "fleet.backup"
    code, output = _cli("backup", "--home", str(server.layout.root), "--out", str(archive))
    assert code == 0, output
    assert archive.stat().st_mode & 0o777 == 0o600
    server.stop()
    code, output = _cli("restore", str(archive), "--home", str(tmp_path / "restored"),
                        *restore_args)  # fmt: skip
    assert code == 0, output
    restored = start_live_server(tmp_path / "restored")
    # The fleet came back: the enrolled device and the unspent token, in the restored registry.
    assert len(restored.registry.certificates_of(DeviceId("bk-1"))) == 1
    assert enroll(restored, "bk-2", unspent).status == 200
    assert enroll(restored, "bk-2", unspent).status == 401  # spent once, as before
    return restored


def test_sqlite_backup_restores_a_system_that_enrolls(tmp_path: Path) -> None:
    restored = _round_trip(start_live_server(tmp_path / "home"), tmp_path)
    restored.stop()
    for folder in (tmp_path / "restored", tmp_path / "restored" / "ca"):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_postgresql_backup_restores_into_an_empty_database(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    server = start_live_server(tmp_path / "home", registry=bare, registry_password=PASSWORD)
    target = pg_cluster.new_database().replace(f":{PASSWORD}@", "@")
    restored = _round_trip(server, tmp_path, "--registry", target)
    try:
        # It serves from the database it was restored into, not the original's.
        assert str(restored.handle.state.registry.location) == target
    finally:
        restored.stop()


def test_a_damaged_backup_or_a_used_folder_writes_nothing(tmp_path: Path) -> None:
    server = start_live_server(tmp_path / "home")
    archive = tmp_path / "fleet.backup"
    try:
        assert _cli("backup", "--home", str(server.layout.root), "--out", str(archive))[0] == 0
    finally:
        server.stop()
    truncated = tmp_path / "cut.backup"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, output = _cli("restore", str(truncated), "--home", str(tmp_path / "r1"))
    assert code == 2 and "not a readable fleetpki backup" in output, output
    not_ours = tmp_path / "other.tgz"
    not_ours.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    assert _cli("restore", str(not_ours), "--home", str(tmp_path / "r2"))[0] == 2
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine").write_text("keep")
    code, output = _cli("restore", str(archive), "--home", str(used))
    assert code == 2 and "not empty" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["home", "fleet.backup", "cut.backup", "other.tgz", "used"]
    )
    assert [p.name for p in used.iterdir()] == ["mine"]


def test_backup_into_a_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    server = start_live_server(tmp_path / "home")
    server.stop()
    code, output = _cli("backup", "--home", str(server.layout.root),
                        "--out", str(tmp_path / "out-folder" / "x.backup"))  # fmt: skip
    assert code == 1 and "cannot write" in output, output
