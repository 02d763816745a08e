"""Issue 18, campaign 2 (short form): kill -9 of `batch create`, `device revoke`, `batch revoke`
and `server-cert renew` at random moments, and at the two moments that used to leave a home
half-changed: each command is all or nothing (batch revoke: each device, resumable), and the
rerun completes it. The long form is bench/faults_kill_cli.py (BENCHMARKS.md, Faults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from enroll_server.home.layout import HomeLayout
from enroll_server.home.server_certificate import read_pair
from tests.kill_cli import bundle_problems, campaign, child_env, cli, read_only, run_cli, staging_of
from tests.live_server import make_home


def test_kill_9_of_revocations_at_a_random_moment(tmp_path: Path) -> None:
    # The two commands that need a running server (CRL, OCSP, a live broker session); batch
    # create and server-cert renew are killed at their worst moments below (all four, many
    # times each, in bench/faults_kill_cli.py).
    commands = ("device revoke", "batch revoke")
    tallies = campaign(1, seed=5, revoke_size=600, commands=commands, folder=tmp_path)
    assert [t.command for t in tallies] == list(commands)
    for tally in tallies:
        assert tally.violations == [], tally.to_json()
        assert tally.kills == tally.reruns == 1, tally.to_json()


def killed_at(hook: str, argv: list[str], cwd: Path) -> None:
    """Run the fleetpki CLI in a child that SIGKILLs itself when `hook` (Python, defining
    patch(kill) that wraps some function to call kill()) fires."""
    script = (
        textwrap.dedent(
            """
        import os, runpy, signal, sys
        def kill():
            os.kill(os.getpid(), signal.SIGKILL)
        """
        )
        + textwrap.dedent(hook)
        + textwrap.dedent(
            """
        patch(kill)
        sys.argv = ["fleetpki", *sys.argv[1:]]
        runpy.run_module("enroll_server.cli", run_name="__main__")
        """
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *argv[3:]], cwd=cwd, env=child_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == -9, (done.returncode, done.stdout, done.stderr)


# After the registry commit, before the rename: the batch is registered and its bundles sit
# complete in the hidden staging folder. Before the sync: nothing is registered.
AFTER_COMMIT = """
    from provisioning import outdir
    def patch(kill):
        outdir.StagedOutput.publish = lambda self: kill()
"""
BEFORE_COMMIT = """
    from provisioning import outdir
    def patch(kill):
        outdir.StagedOutput.sync = lambda self: kill()
"""


@pytest.mark.parametrize("hook", [AFTER_COMMIT, BEFORE_COMMIT], ids=["after-commit", "before"])
def test_batch_create_killed_around_its_commit_is_finished_by_the_rerun(
    tmp_path: Path, hook: str
) -> None:
    layout = make_home(tmp_path / "home")
    out = tmp_path / "lot"
    argv = cli("batch", "create", "--home", str(layout.root), "--count", "5", "--out", str(out))
    killed_at(hook, argv, tmp_path)
    assert not out.exists()
    assert len(staging_of(out)) == 1
    again = run_cli(argv, tmp_path)
    assert again.returncode == 0, again.stderr
    with read_only(layout) as db:
        batches = [r[0] for r in db.execute("SELECT id FROM batches").fetchall()]
    assert len(batches) == 1
    assert bundle_problems(layout, out, batches[0], 5) == []
    assert staging_of(out) == []
    if hook is AFTER_COMMIT:
        assert "finished" in again.stdout


def test_server_cert_renew_killed_between_key_and_certificate_keeps_a_matching_pair(
    tmp_path: Path,
) -> None:
    layout = make_home(tmp_path / "home")
    _, _, before = read_pair(layout.server_cert, layout.server_key)
    argv = cli("server-cert", "renew", "--home", str(layout.root))
    # The new key is written; the certificate is about to be.
    killed_at(
        """
        from enroll_server.home import layout
        def patch(kill):
            write = layout.write_atomic
            def write_or_die(path, data, mode=0o600):
                if path.name == "server.pem":
                    kill()
                write(path, data, mode)
            layout.write_atomic = write_or_die
        """,
        argv,
        tmp_path,
    )
    _, _, now = read_pair(layout.server_cert, layout.server_key)
    assert now.serial_number == before.serial_number
    again = run_cli(argv, tmp_path)
    assert again.returncode == 0, again.stderr
    _, _, after = read_pair(layout.server_cert, layout.server_key)
    assert after.serial_number != before.serial_number
    assert sorted(p.name for p in HomeLayout(layout.root).tls_dir.iterdir()) == [
        "server.key", "server.pem",
    ]  # fmt: skip
    assert not (layout.root / ".tls.next").exists()
