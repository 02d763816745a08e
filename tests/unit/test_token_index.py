"""TokenIndex on a real registry file: what it loads, what it vouches for, how it stays fresh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from enroll_server.enrollment.token_index import TokenIndex
from enroll_server.registry import NewDevice, Registry, Role
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa
from tests.unit.test_registry import NOW, TTL, issued, token_hash

LATER = NOW + timedelta(minutes=1)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry.open(tmp_path / "registry.db")
    yield registry
    registry.close()


def batch(reg: Registry, name: str, devices: list[str], ttl: timedelta = TTL) -> None:
    reg.create_batch(
        name,
        (NewDevice(DeviceId(d), token_hash(d), NOW + ttl) for d in devices),
        kind="token",
        token_ttl=ttl,
        now=NOW,
        actor="test",
    )


def index(reg: Registry, **kwargs: object) -> TokenIndex:
    return TokenIndex(reg, wall=lambda: LATER, **kwargs)  # type: ignore[arg-type]


def test_loads_only_tokens_that_can_still_enroll(reg: Registry, ca: MemoryCa) -> None:
    batch(reg, "b1", ["dev-ok", "dev-spent", "dev-revoked", "dev-suspended"])
    batch(reg, "b2", ["dev-expired"], ttl=timedelta(seconds=30))  # expired at LATER
    reg.record_issuance(
        issued(ca, "dev-spent"),
        consume_token_hash=token_hash("dev-spent"),
        supersedes_serial=None,
        now=NOW,
        actor="est",
    )
    reg.revoke_device(DeviceId("dev-revoked"), reason="keyCompromise", now=NOW, actor="op")
    reg.suspend_device(DeviceId("dev-suspended"), now=NOW, actor="op")
    idx = index(reg)
    idx.read_all()
    # The spent token's device is active: it may renew, but its token is used.
    assert len(idx) == 1
    assert "dev-ok" in idx
    for gone in ("dev-spent", "dev-revoked", "dev-suspended", "dev-expired"):
        assert gone not in idx


def test_take_vouches_once_and_only_for_the_exact_token(reg: Registry) -> None:
    batch(reg, "b1", ["dev-a", "dev-b"])
    idx = index(reg)
    idx.read_all()
    # Another device's token, a wrong one, and an expired use: no, and the entry stays.
    assert idx.take("dev-a", token_hash("dev-b"), NOW) is None
    assert idx.take("dev-a", token_hash("nope"), NOW) is None
    assert idx.take("dev-a", token_hash("dev-a"), NOW + TTL) is None
    assert idx.take("dev-unknown", token_hash("dev-a"), NOW) is None
    assert "dev-a" in idx
    assert idx.take("dev-a", token_hash("dev-a"), NOW) is Role.DEVICE
    # One-time: a second request with it (a retry, a duplicate) must ask the registry.
    assert idx.take("dev-a", token_hash("dev-a"), NOW) is None
    assert "dev-a" not in idx
    assert "dev-b" in idx
    idx.discard("dev-b")
    assert idx.take("dev-b", token_hash("dev-b"), NOW) is None


def test_reads_in_slices_of_rowids_and_then_only_what_is_new(reg: Registry) -> None:
    batch(reg, "b1", [f"dev-{i}" for i in range(7)])
    idx = index(reg, chunk=3)
    assert idx.read_slice() is True
    assert len(idx) == 3
    assert idx.read_slice() is True
    assert idx.read_slice() is False
    assert len(idx) == 7
    assert idx.read_slice() is False  # nothing new
    # A batch created since (another process: `fleetpki batch create`) and a reissue.
    batch(reg, "b2", ["dev-new"])
    reg.add_token(DeviceId("dev-1"), token_hash("dev-1 again"), NOW + TTL, NOW)
    idx.read_all()
    assert "dev-new" in idx
    assert idx.take("dev-1", token_hash("dev-1"), NOW) is None  # the reissue replaced it
    assert idx.take("dev-1", token_hash("dev-1 again"), NOW) is Role.DEVICE


def test_role_comes_from_the_device(reg: Registry) -> None:
    reg.add_device(DeviceId("svc-1"), batch_id=None, now=NOW, actor="op", role=Role.SERVICE)
    reg.add_token(DeviceId("svc-1"), token_hash("svc-1"), NOW + TTL, NOW)
    idx = index(reg)
    idx.read_all()
    assert idx.take("svc-1", token_hash("svc-1"), NOW) is Role.SERVICE


def test_stops_adding_at_its_limit_and_says_so(reg: Registry) -> None:
    batch(reg, "b1", [f"dev-{i}" for i in range(5)])
    idx = index(reg, limit=3)
    assert "fleetpki_token_index_full 0" in idx.metrics_text()
    idx.read_all()
    assert len(idx) == 3
    assert idx.full
    text = idx.metrics_text()
    assert "fleetpki_token_index_entries 3" in text
    assert "fleetpki_token_index_full 1" in text
    # A reissue for a device it holds still replaces its entry.
    reg.add_token(DeviceId("dev-0"), token_hash("dev-0 again"), NOW + TTL, NOW)
    idx.read_all()
    assert idx.take("dev-0", token_hash("dev-0 again"), NOW) is Role.DEVICE


async def test_keeps_fresh_when_told_of_an_unknown_token(reg: Registry) -> None:
    batch(reg, "b1", ["dev-a"])
    idx = index(reg, chunk=2, min_interval=0.2)
    idx.start()
    try:
        await until(lambda: "dev-a" in idx)
        batch(reg, "b2", ["dev-b", "dev-c", "dev-d"])
        await asyncio.sleep(0.3)
        assert "dev-b" not in idx  # nobody asked: the index reads only when told
        started = time.monotonic()
        idx.unknown_token_seen()
        await until(lambda: "dev-d" in idx)
        assert "dev-b" in idx and "dev-c" in idx
        # Told again at once: the next read waits out min_interval after the last one.
        batch(reg, "b3", ["dev-e"])
        idx.unknown_token_seen()
        await until(lambda: "dev-e" in idx)
        assert time.monotonic() - started >= 0.2
    finally:
        await idx.stop()


async def until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_token_met_during_a_long_read_prompts_another(reg: Registry) -> None:
    batch(reg, "b1", [f"dev-{i}" for i in range(60)])
    idx = index(reg, chunk=1, min_interval=0.05)
    idx.start()
    try:
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(idx) < 60  # still reading, one row a loop iteration
        batch(reg, "b2", ["dev-late"])  # beyond the rowid this read stops at
        idx.unknown_token_seen()
        await until(lambda: "dev-late" in idx)
        assert len(idx) == 61
    finally:
        await idx.stop()
