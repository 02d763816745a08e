"""`fleetpki demo` (what `make demo` runs): the whole story, exit 0, under a minute, no trace."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_demo_tells_the_story_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", "demo", "--workdir", str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    elapsed = time.monotonic() - began
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
    # Each promise of the story, in plain words.
    assert "fleetpki init" in out and "fleetpki serve" in out and "batch create --count 25" in out
    assert "25/25 enrolled" in out and "25/25 connected over mTLS" in out
    assert "from 25/25 devices" in out
    assert "the broker dropped its live session" in out and "(promise: within 1 s)" in out
    assert "was refused" in out and "stopped for good" in out
    assert "renewed over EST simplereenroll with a fresh key" in out
    assert "the other 23 devices stayed connected the whole time (0 disconnections)" in out
    assert ", 0 lost" in out
    assert "FAILED" not in out
    assert "demo OK" in out
    # Nothing left behind: the temporary home, bundles and agent state are gone, and no
    # process still refers to them.
    assert list(work.iterdir()) == []
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(work) in part for part in (p.info["cmdline"] or []))
    ]
    assert leftovers == []


def test_demo_refuses_a_fleet_too_small_for_its_story(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", "demo", "--devices", "3", "--workdir",
         str(tmp_path / "w")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "the demo needs at least 7 devices" in proc.stderr
    assert not (tmp_path / "w").exists() or list((tmp_path / "w").iterdir()) == []
