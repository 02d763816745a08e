"""Piped `fleetpki` output keeps whole values: a table cut at 80 columns (or at the width of
whatever terminal stdin is) loses serials, batch ids and times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.live_server import make_home

PREFIX = "a-rather-long-device-name-prefix-for-the-plant-floor-"


def fleetpki(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True,  # stdout is a pipe, as in `fleetpki device list | grep ...`
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_piped_tables_print_whole_values(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    make_home(Path(home))
    created = fleetpki(
        "batch", "create", "--home", home, "--count", "2", "--prefix", PREFIX,
        "--out", str(tmp_path / "lot"), "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    batch_id = json.loads(created.stdout)["batch_id"]
    listed = fleetpki("device", "list", "--home", home)
    assert listed.returncode == 0, listed.stderr
    for device in (f"{PREFIX}000001", f"{PREFIX}000002"):
        assert device in listed.stdout, listed.stdout
    assert batch_id in listed.stdout
    assert max(len(line) for line in listed.stdout.splitlines()) > 100
    batches = fleetpki("batch", "list", "--home", home)
    assert batches.returncode == 0 and batch_id in batches.stdout, batches.stdout
