"""Revoked, suspended and cut-off identities: CONNACK 5 (not authorized), the reason logged.

MQTT 3.1.1 section 3.2.2.3 has one return code for all three; the agent learns which from the
EST service (its Fleetpki-Error code). The broker's log line names the reason label.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from enroll_server.broker import RunningBroker
from tests.integration import broker_harness
from tests.integration.broker_harness import PAHO_NOT_AUTHORIZED, Fleet, PahoDevice

fleet = broker_harness.fleet
broker = broker_harness.broker


async def test_each_refusal_is_not_authorized_and_logs_its_reason(
    fleet: Fleet, broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    revoked = fleet.issue("r-revoked")
    fleet.revoke("r-revoked")
    suspended = fleet.issue("r-suspended")
    fleet.suspend("r-suspended")
    old = fleet.issue("r-renewed")
    fleet.issue("r-renewed")  # the newer certificate; the older one is cut off
    fleet.registry.revoke_certificate(
        old.cert.serial_number, reason="superseded", now=datetime.now(UTC), actor="test"
    )
    caplog.set_level(logging.INFO, logger="enroll_server.broker.hardening.broker")
    for creds, label in (
        (revoked, "device_revoked"),
        (suspended, "device_suspended"),
        (old, "cert_revoked"),
    ):
        dev = PahoDevice(creds, broker.port, fleet.ca_file)
        assert await dev.connect() == PAHO_NOT_AUTHORIZED, label
        await dev.close()
        lines = [r.getMessage() for r in caplog.records if "refused CONNECT" in r.getMessage()]
        assert any(f"({label})" in line and creds.device_id in line for line in lines), lines
