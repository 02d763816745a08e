"""`fleetpki-agent status`: what the device is, what it holds, and what it last did (read-only)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.config import AgentConfig
from device_agent.errors import KeystoreError
from device_agent.exit_codes import ExitCode
from device_agent.keystore import Keystore
from device_agent.state_lock import LOCK_FILE, lock_holder


def _age(delta_s: float) -> str:
    sign = "in " if delta_s >= 0 else ""
    s = abs(delta_s)
    text = (
        f"{s / 86400:.1f} days"
        if s >= 86400
        else f"{s / 3600:.1f} h"
        if s >= 3600
        else f"{s / 60:.1f} min"
        if s >= 60
        else f"{s:.0f} s"
    )
    return f"{sign}{text}" if delta_s >= 0 else f"{text} ago"


def _running(state_dir: Path, pid: object) -> bool:
    """Is an agent using the state folder? Its lock says so; a state folder without a lock
    file (an older agent) falls back to the pid that last wrote status.json."""
    if lock_holder(state_dir) is not None:
        return True
    if (state_dir / LOCK_FILE).exists():
        return False
    return _alive(pid)


def _alive(pid: object) -> bool:
    """Is the process that last wrote status.json still there? (The state may be stale.)"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user (the service account)
    return True


def status_report(config: AgentConfig, now: datetime) -> tuple[dict[str, Any], ExitCode]:
    """The status as a flat dict (for --json) and the exit code: OK when a valid certificate
    is stored, REBOOTSTRAP when none is (or it expired), CONFIG when the state is unusable."""
    store = Keystore(config.state_dir)
    status = store.read_status()
    report: dict[str, Any] = {
        "device": str(config.device_id),
        "config": str(config.path),
        "state_dir": str(config.state_dir),
        "agent_state": status.get("state", "unknown (agent never ran)"),
        "agent_running": _running(config.state_dir, status.get("pid")),
        "agent_state_since": status.get("since"),
        "last_connected": status.get("last_connected"),
        "last_error": status.get("last_error"),
    }
    if config.idevid is not None:
        # The birth certificate is kept for good; whether it still loads was checked when
        # agent.toml was.
        report["bootstrap"] = f"factory birth certificate {config.idevid.cert}"
    else:
        report["bootstrap"] = "token"
        report["token_present"] = config.token_file.exists()
    try:
        ident = store.load()
    except KeystoreError as exc:
        report["identity"] = f"unusable: {exc}"
        return report, ExitCode.CONFIG
    if ident is None:
        report["identity"] = "not enrolled"
        return report, ExitCode.REBOOTSTRAP
    left = (ident.not_after - now).total_seconds()
    report.update(
        identity="enrolled",
        certificate_serial=ident.serial_hex,
        not_before=ident.not_before.isoformat(),
        not_after=ident.not_after.isoformat(),
        expires=_age(left) if left > 0 else f"EXPIRED {_age(left)}",
        next_renewal=ident.next_renewal.isoformat(),
        next_renewal_in=_age((ident.next_renewal - now).total_seconds()),
        generation=ident.generation,
        key_file=str(ident.key_path),
    )
    return report, ExitCode.OK if left > 0 else ExitCode.REBOOTSTRAP


def format_report(report: dict[str, Any]) -> str:
    width = max(len(k) for k in report) + 1
    return "\n".join(
        f"{(k.replace('_', ' ') + ':'):<{width + 1}} {'-' if v is None else v}"
        for k, v in report.items()
    )
