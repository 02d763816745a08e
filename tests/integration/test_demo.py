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


@pytest.mark.timeout(120)
def test_demo_keep_running_leaves_the_fleet_and_its_console_up(tmp_path: Path) -> None:
    """`fleetpki demo --keep-running`: after the story the fleet stays up and the console's
    URL and a login are printed; the console shows the demo fleet; Ctrl-C then cleans up."""
    import re
    import signal
    import ssl

    from tests.console_client import ConsoleClient

    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "demo", "--devices", "7", "--keep-running",
         "--workdir", str(work)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 80
        while time.monotonic() < deadline and not any("Ctrl-C stops" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        out = "".join(lines)
        url = re.search(r"console +(https://127\.0\.0\.1:\d+/console/)", out)
        token = re.search(r"login +(\S+)", out)
        assert url and token, out
        root = next(work.glob("fleetpki-sim-*/home/ca/root.pem"))
        client = ConsoleClient(
            url.group(1).removesuffix("/console/"), ssl.create_default_context(cafile=str(root))
        )
        assert client.login(token.group(1)).status == 303
        overview = client.get("/console/").text
        assert 'data-count="active" id="count-active">6<' in overview, overview[:3000]
        assert 'id="count-revoked">1<' in overview
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + rest
    assert "demo OK" in rest
    assert list(work.iterdir()) == []
