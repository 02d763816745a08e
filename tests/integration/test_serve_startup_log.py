"""`fleetpki serve` starts with its own lines only: amqtt's state machine (the `transitions`
library) logs every broker state change at INFO, noise an operator reads as a problem."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from enroll_server.cli.app import app


def test_serve_start_up_has_no_transitions_lines(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert CliRunner().invoke(app, ["init", "--home", str(home)]).exit_code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home),
         "--est-port", "0", "--http-port", "0", "--mqtt-port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        # The broker comes up first, then the HTTP listeners; the last one names EST.
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "fleetpki.server: EST on" in line:
                break
        assert any("fleetpki.server: EST on" in line for line in lines), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    lines += out.splitlines()
    assert any("MQTT broker (mTLS) listening" in line for line in lines), lines
    assert not [line for line in lines if "transitions" in line], lines
