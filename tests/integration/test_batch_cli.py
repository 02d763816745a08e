"""`fleetpki batch ...` as operators run it: the mounted CLI, --json, bad input, and Ctrl-C of a
real `fleetpki batch create` process leaving nothing behind."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.home.layout import HomeLayout
from enroll_server.registry import Registry
from tests.live_server import make_home

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> str:
    make_home(tmp_path / "home")
    return str(tmp_path / "home")


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["batch", *args])
    return result.exit_code, result.stdout, result.stderr


def registry_of(home: str) -> Registry:
    return Registry.open(HomeLayout(Path(home)).registry)


def test_create_list_show_export_reissue_revoke(home: str, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    code, stdout, stderr = run(
        "create", "--home", home, "--count", "5", "--prefix", "cam-", "--out", str(out),
        "--token-ttl", "2d", "--batch-id", "lot-cam", "--note", "line 3", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    created = json.loads(stdout)
    assert created["batch_id"] == "lot-cam" and created["count"] == 5
    assert created["manifest"] == str(out / "manifest.csv")
    assert "tokens" not in created
    assert (out / "cam-000005" / "token").exists()

    code, stdout, _ = run("list", "--home", home, "--json")
    (summary,) = json.loads(stdout)
    assert summary["counts"]["provisioned"] == 5 and summary["note"] == "line 3"
    assert summary["token_ttl_seconds"] == 2 * 86400

    code, stdout, _ = run("show", "lot-cam", "--home", home)
    assert code == 0 and "provisioned" in stdout and "lot-cam" in stdout

    code, stdout, _ = run("export", "lot-cam", "--home", home)
    rows = list(csv.reader(io.StringIO(stdout)))
    assert rows[0] == ["device_id", "bundle", "token_expires_at", "state"]
    assert [r[0] for r in rows[1:]] == [f"cam-{n:06d}" for n in range(1, 6)]
    export_file = tmp_path / "export.csv"
    code, _, _ = run("export", "lot-cam", "--home", home, "--out", str(export_file))
    assert code == 0 and export_file.read_text() == stdout

    old = (out / "cam-000001" / "token").read_text()
    code, stdout, _ = run("reissue-token", "cam-000001", "--home", home, "--stdout")
    new = stdout.strip()
    assert code == 0 and len(new) >= 43 and new != old
    code, stdout, stderr = run("reissue-token", "cam-000002", "--home", home, "--out", str(out))
    assert code == 2 and "--force" in stderr
    code, stdout, _ = run(
        "reissue-token", "cam-000002", "--home", home, "--out", str(out), "--force", "--json"
    )
    assert code == 0 and json.loads(stdout)["bundle"] == str(out / "cam-000002")
    assert "token" not in json.loads(stdout)

    code, _, stderr = run("revoke", "lot-cam", "--home", home, "--reason", "bored", "--yes")
    assert code == 2 and "reason" in stderr
    code, stdout, _ = run(
        "revoke", "lot-cam", "--home", home, "--reason", "key-compromise", "--json"
    )
    assert code == 0 and json.loads(stdout)["revoked_devices"] == 5
    code, stdout, _ = run("show", "lot-cam", "--home", home, "--json")
    assert json.loads(stdout)["counts"]["revoked"] == 5


def assert_nothing_created(home: str, tmp_path: Path, keep: set[str]) -> None:
    with registry_of(home) as registry:
        assert registry.list_batches() == [] and registry.count_devices() == 0
    assert {p.name for p in tmp_path.iterdir()} == {"home", *keep}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "at least one device"),
        (["--count", "5000000"], "at most 200000"),
        (["--count", "3", "--prefix", "a b-"], "' '"),
        (["--count", "3", "--prefix", "../"], "'.'"),
        (["--count", "3", "--prefix", "x/"], "'/'"),
        (["--count", "3", "--token-ttl", "soon"], "invalid duration"),
        (["--count", "3", "--batch-id", "a/b"], "batch id"),
        (["--count", "3", "--idevid-csrs", "x.pem"], "needs --idevid"),
        ([], "--count"),
    ],
)
def test_bad_input_creates_nothing(
    home: str, tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, stderr = run("create", "--home", home, "--out", str(tmp_path / "lot"), *args)
    assert code == 2
    assert message in stderr
    assert_nothing_created(home, tmp_path, set())


def test_bad_serial_list_names_the_line(home: str, tmp_path: Path) -> None:
    serials = tmp_path / "serials.csv"
    serials.write_text("serial\nSN-1\nSN-2\nSN 3\n")
    code, _, stderr = run(
        "create", "--home", home, "--ids-from", str(serials), "--out", str(tmp_path / "lot")
    )
    assert code == 2 and "line 4" in stderr and "'SN 3'" in stderr
    serials.write_text("SN-1\nSN-2\nSN-1\n")
    code, _, stderr = run(
        "create", "--home", home, "--ids-from", str(serials), "--out", str(tmp_path / "lot")
    )
    assert code == 2 and "line 3" in stderr and "duplicate of line 1" in stderr
    assert_nothing_created(home, tmp_path, {"serials.csv"})


def test_serial_list_with_a_quoted_newline_names_the_row(home: str, tmp_path: Path) -> None:
    """A quoted cell may hold a newline (RFC 4180 2.6): that id is refused, no traceback."""
    serials = tmp_path / "serials.csv"
    serials.write_text('serial\nSN-1\n"SN-2\n"\nSN-3\n')
    result = runner.invoke(
        app,
        [
            "batch",
            "create",
            "--home",
            home,
            "--ids-from",
            str(serials),
            "--out",
            str(tmp_path / "lot"),
        ],
    )
    assert result.exit_code == 2, result.exception
    assert "line 4" in result.stderr and "'SN-2\\n'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert_nothing_created(home, tmp_path, {"serials.csv"})


def test_export_never_writes_through_a_planted_symlink(home: str, tmp_path: Path) -> None:
    """Symlinks planted at the old fixed temporary name and at the target itself: export
    writes neither victim; the target becomes a regular file with the manifest."""
    code, _, stderr = run("create", "--home", home, "--count", "2", "--batch-id", "lot",
                          "--out", str(tmp_path / "lot"))  # fmt: skip
    assert code == 0, stderr
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("via-temp", "via-target"):
        (victims / name).write_text("precious\n")
    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "manifest.csv"
    (exports / ".manifest.csv.tmp").symlink_to(victims / "via-temp")
    target.symlink_to(victims / "via-target")
    code, _, stderr = run("export", "lot", "--home", home, "--out", str(target))
    assert code == 0, stderr
    assert (victims / "via-temp").read_text() == "precious\n"
    assert (victims / "via-target").read_text() == "precious\n"
    assert not target.is_symlink() and target.read_text().startswith("device_id,")
    assert os.stat(target).st_mode & 0o777 == 0o644
    # A failed export (unknown batch) leaves the file as it was and no temp file behind.
    before = target.read_bytes()
    assert run("export", "nope", "--home", home, "--out", str(target))[0] == 3
    assert target.read_bytes() == before
    assert sorted(p.name for p in exports.iterdir()) == [".manifest.csv.tmp", "manifest.csv"]


def test_non_empty_out_needs_force(home: str, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    code, _, stderr = run("create", "--home", home, "--count", "2", "--out", str(out))
    assert code == 2 and "not empty" in stderr
    code, _, _ = run("create", "--home", home, "--count", "2", "--out", str(out), "--force")
    assert code == 0 and (out / "dev-000002" / "agent.toml").exists()


def test_unknown_things_exit_3(home: str) -> None:
    assert run("show", "nope", "--home", home)[0] == 3
    assert run("export", "nope", "--home", home)[0] == 3
    assert run("revoke", "nope", "--home", home, "--reason", "unspecified", "--yes")[0] == 3
    assert run("reissue-token", "ghost", "--home", home, "--stdout")[0] == 3


def test_uninitialized_home(tmp_path: Path) -> None:
    code, _, stderr = run("list", "--home", str(tmp_path / "nothing"))
    assert code == 2 and "not initialized" in stderr


def test_ctrl_c_of_a_real_process_leaves_nothing(home: str, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "batch", "create", "--home", home,
         "--count", "150000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        # Wait until bundles are being written into the staging folder, then interrupt.
        deadline = time.monotonic() + 60
        staged: list[Path] = []
        while time.monotonic() < deadline:
            staged = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
            if staged and sum(1 for _ in os.scandir(staged[0])) > 20:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert staged, "no staging folder appeared"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # (Seen twice in full-suite runs on a loaded machine, never alone: exit 0 with an empty
    # stderr. The output is in the message so the next occurrence says what the child did.)
    assert proc.returncode == 130, (stdout[-500:], stderr[-500:])
    assert b"interrupted" in stderr
    assert_nothing_created(home, tmp_path, set())
