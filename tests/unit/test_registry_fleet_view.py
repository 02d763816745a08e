"""The console's registry reads (registry/fleet_view.py) on both backends: a page of devices
by prefix, state and batch; counts by state; the audit log filtered by actor, action, device
and time; activity since a time; certificates expiring unrenewed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from enroll_server.registry import Device, NewDevice, Registry
from enroll_server.registry.fleet_view import AuditQuery, DeviceQuery
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa
from tests.unit.test_registry import NOW, TTL, enroll, issued, token_hash


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    with Registry.open(registry_location) as registry:
        yield registry


def ids(devices: list[Device]) -> list[str]:
    return [d.device_id.value for d in devices]


def test_device_pages_by_prefix_state_and_batch(reg: Registry) -> None:
    batch = [NewDevice(DeviceId(f"pi-{i:03d}"), token_hash(f"pi-{i}")) for i in range(1, 31)]
    reg.create_batch("lot-a", batch, kind="token", token_ttl=TTL, now=NOW, actor="op")
    reg.add_device(DeviceId("pi1-x"), now=NOW, actor="op")  # no batch; sorts after pi-0..
    reg.add_device(DeviceId("svc"), role="service", now=NOW, actor="op")  # not a device
    reg.revoke_device(DeviceId("pi-012"), reason="keyCompromise", now=NOW, actor="op")
    assert ids(reg.device_page(DeviceQuery(prefix="pi-01"), limit=5, offset=0)) == [
        f"pi-01{i}" for i in range(5)
    ]
    assert reg.device_total(DeviceQuery(prefix="pi-01")) == 10
    assert reg.device_total(DeviceQuery(prefix="pi")) == 31
    assert reg.device_total(DeviceQuery()) == 31  # the service is on the services page
    assert ids(
        reg.device_page(DeviceQuery(prefix="pi-00", descending=True), limit=2, offset=1)
    ) == [
        "pi-008",
        "pi-007",
    ]
    assert ids(reg.device_page(DeviceQuery(state="revoked"), limit=10, offset=0)) == ["pi-012"]
    assert reg.device_total(DeviceQuery(batch_id="lot-a", state="provisioned")) == 29
    assert reg.devices_by_state() == {"provisioned": 30, "active": 0, "suspended": 0, "revoked": 1}


def test_audit_filters_and_time_window(reg: Registry) -> None:
    for i in range(6):
        reg.append_audit(
            actor="operator:alice" if i % 2 else "cli",
            action="device.suspend" if i < 3 else "device.resume",
            device_id=DeviceId(f"d-{i % 2}"),
            detail={"i": i},
            now=NOW + timedelta(hours=i),
        )
    found = reg.audit_search(AuditQuery(actor="operator:alice"), limit=10)
    assert [e.detail["i"] for e in found] == [5, 3, 1]  # newest first
    found = reg.audit_search(
        AuditQuery(action="device.resume", device_id=DeviceId("d-0")), limit=10
    )
    assert [e.detail["i"] for e in found] == [4]
    window = AuditQuery(since=NOW + timedelta(hours=2), until=NOW + timedelta(hours=4))
    assert [e.detail["i"] for e in reg.audit_search(window, limit=10)] == [3, 2]
    older = reg.audit_search(AuditQuery(before_seq=found[0].seq), limit=2)
    assert [e.detail["i"] for e in older] == [3, 2]
    assert [
        e.detail["i"] for e in reg.audit_search(AuditQuery(since=NOW + timedelta(days=1)), limit=5)
    ] == []
    since = reg.audit_actions_since(NOW + timedelta(hours=4), ("device.resume",))
    assert [a for _, a, _ in since] == ["device.resume", "device.resume"]
    last = reg.last_audit_seq()
    assert [e.detail["i"] for e in reg.audit_after(last - 2)] == [4, 5]


def test_certificates_expiring_without_a_renewal(reg: Registry, ca: MemoryCa) -> None:
    enroll(reg, ca, "old")  # 30-day certificates from NOW
    enroll(reg, ca, "renewed")
    renewal = issued(ca, "renewed", now=NOW + timedelta(days=25))
    current = reg.certificates_of(DeviceId("renewed"))[0]
    reg.record_issuance(
        renewal, consume_token_hash=None, supersedes_serial=current.serial,
        now=NOW + timedelta(days=25), actor="est",
    )  # fmt: skip
    now = NOW + timedelta(days=26)
    found, total = reg.expiring_unrenewed(now, now + timedelta(days=7))
    assert total == 1 and [c.device_id.value for c in found] == ["old"]
    assert reg.expiring_unrenewed(NOW, NOW + timedelta(days=7)) == ([], 0)
