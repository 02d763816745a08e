"""One fleetpki-agent process per state folder: `enroll --force` (or a second `run`) next to a
running agent is refused and changes nothing; `enroll` says what it did; an unwritable state
folder is a config error before any token is spent. Real agent processes, real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from device_agent.exit_codes import ExitCode
from device_agent.keystore import Keystore
from enroll_server.home.layout import hash_secret, new_secret
from fleetpki.identity import DeviceId
from tests.integration.test_agent_e2e import DEV, bundle_for, bundle_for_server_only
from tests.integration.test_agent_suspension import agent_cli, wait_for
from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parents[2]


def new_token(server: LiveServer, config: Path) -> None:
    """The operator re-admits the device with a new token, written to the token file."""
    token, now = new_secret(), datetime.now(UTC)
    server.registry.add_token(DeviceId(DEV), hash_secret(token), now + timedelta(days=1), now)
    (config.parent / "token").write_text(token + "\n")


def test_enroll_force_next_to_a_running_agent_is_refused_and_changes_nothing(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    config = bundle_for(live_stack, tmp_path)
    state = config.parent / "state"

    def status_file() -> dict[str, Any]:
        try:
            value = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    agent = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: status_file().get("state") == "connected", 30, "agent connected")
        before = status_file()
        serial = Keystore(state).load().serial_hex  # type: ignore[union-attr]
        new_token(live_stack, config)

        for args in (["enroll", "--force"], ["enroll"], ["run"]):
            r = agent_cli(*args, "--config", str(config))
            assert r.returncode == ExitCode.BUSY, (args, r.stderr)
            assert f"fleetpki-agent process {agent.pid} is using {state}" in r.stderr
            assert "stop it first" in r.stderr
            assert r.stdout == ""
        # Nothing changed: the identity, the token, the running agent's status.
        assert Keystore(state).load().serial_hex == serial  # type: ignore[union-attr]
        assert (config.parent / "token").exists()
        assert status_file()["pid"] == before["pid"] == agent.pid
        report = json.loads(agent_cli("status", "--config", str(config), "--json").stdout)
        assert report["agent_running"] is True
        assert report["agent_state"] == "connected"
        assert report["certificate_serial"] == serial
        assert not report["expires"].startswith("EXPIRED")
        assert agent.poll() is None

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == ExitCode.OK
        assert (
            json.loads(agent_cli("status", "-c", str(config), "--json").stdout)["agent_running"]
            is False
        )

        # Stopped: now `enroll` may act, and says what it did.
        r = agent_cli("enroll", "--config", str(config))
        assert r.returncode == ExitCode.OK, r.stderr
        assert r.stdout.startswith(f"{DEV}: already enrolled (certificate serial {serial},")
        assert "nothing to do" in r.stdout
        r = agent_cli("enroll", "--force", "--config", str(config))
        assert r.returncode == ExitCode.OK, r.stderr
        fresh = Keystore(state).load()
        assert fresh is not None and fresh.serial_hex != serial
        assert r.stdout.startswith(f"{DEV}: enrolled: certificate serial {fresh.serial_hex},")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)


def test_unwritable_state_folder_is_a_config_error_before_any_token_is_spent(
    live_server: LiveServer, tmp_path: Path
) -> None:
    config = bundle_for_server_only(live_server, tmp_path)
    good = config.read_text()
    unwritable = "/sys/fleetpki-agent-test-state"  # not creatable, not even by root
    config.write_text(good.replace('dir = "state"', f'dir = "{unwritable}"'))
    r = agent_cli("enroll", "--config", str(config))
    assert r.returncode == ExitCode.CONFIG, r.stderr
    assert f"{config}: state.dir: cannot write {unwritable}" in r.stderr
    assert (config.parent / "token").exists()
    assert live_server.registry.certificates_of(DeviceId(DEV)) == []
    # Pointed at a writable folder, the same token enrolls.
    config.write_text(good)
    r = agent_cli("enroll", "--config", str(config))
    assert r.returncode == ExitCode.OK, r.stderr
    assert r.stdout.startswith(f"{DEV}: enrolled: certificate serial ")
