"""The line protocol between a ShardedFleet and its shard processes (simulators/shard.py)."""

from __future__ import annotations

import json

import pytest

from device_agent.backoff import Backoff
from device_agent.events import AgentEvent
from simulators.fleet import AgentSettings
from simulators.shard import decode_event, encode_event, settings_from_json, settings_to_json
from simulators.stack import Endpoints


@pytest.mark.parametrize(
    "event",
    [
        AgentEvent.enrolled("0a1b"),
        AgentEvent.renewed("0a1b", "0c2d"),
        AgentEvent.connected(),
        AgentEvent.disconnected("broker went away"),
        AgentEvent.state_changed("renewing"),
        AgentEvent.retry("renew", "no answer in 29.3 s", 1.9),
    ],
)
def test_every_event_kind_crosses_unchanged(event: AgentEvent) -> None:
    line = json.loads(json.dumps(encode_event("dev-1", event)))
    assert decode_event(line) == ("dev-1", event)  # `at` included: one monotonic clock


def test_settings_cross_except_callables() -> None:
    settings = AgentSettings(
        telemetry_interval=10.0,
        mqtt_backoff=Backoff(base=1.0, factor=2.0, cap=10.0),
        clock_poll=0.25,
        endpoints=Endpoints("127.0.0.1", 8443, 8080, 8883),
        on_receipt=lambda device_id, key, at: None,
    )
    data = json.loads(json.dumps(settings_to_json(settings)))
    assert data["receipts"] is True
    back = settings_from_json(data)
    assert back.mqtt_backoff == settings.mqtt_backoff and back.est_backoff is None
    assert (back.telemetry_interval, back.clock_poll) == (10.0, 0.25)
    assert back.endpoints == settings.endpoints
    assert back.on_receipt is None  # the shard sets its own, which writes receipt lines


def test_per_device_clocks_cannot_cross() -> None:
    settings = AgentSettings(clock_for=lambda device_id: lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="clock_for"):
        settings_to_json(settings)
