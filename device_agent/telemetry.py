"""The telemetry message: agent health fields plus the application's own (pure)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime

log = logging.getLogger("fleetpki.agent")

# The application's hook: called at each telemetry tick, returns extra JSON-able fields.
TelemetryHook = Callable[[], Mapping[str, object]]


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def telemetry_payload(
    *,
    now: datetime,
    uptime: float,
    cert_not_after: datetime,
    agent_version: str,
    extra: Mapping[str, object] | None = None,
) -> bytes:
    """JSON telemetry; the agent's own fields win over same-named application fields so that
    the fleet's health view cannot be spoofed by application code."""
    base: dict[str, object] = {
        "ts": _iso(now),
        "uptime": round(uptime, 1),
        "cert_not_after": _iso(cert_not_after),
        "agent_version": agent_version,
    }
    merged: dict[str, object] = {**(extra or {}), **base}
    try:
        return json.dumps(merged, separators=(",", ":"), sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        log.warning(
            "telemetry hook returned data that is not JSON-serialisable (%s); sent without it", exc
        )
        return json.dumps(base, separators=(",", ":"), sort_keys=True).encode()
