"""A batch after creation: counts, export, token reissue, lot revocation (real SQLite)."""

from __future__ import annotations

import csv
import io
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enroll_server.home.config import ServerConfig, load_config
from enroll_server.home.layout import HomeLayout, hash_secret
from enroll_server.registry import DeviceState, Registry, TokenRejected, UnknownBatch
from fleetpki.identity import DeviceId
from provisioning.batch import BatchRequest, create_batch
from provisioning.errors import OutputDirError, ReissueRefused
from provisioning.lifecycle import (
    export_manifest,
    list_batches,
    reissue_token,
    revoke_batch,
    show_batch,
)
from provisioning.manifest import EXPORT_COLUMNS
from tests.live_server import make_home

NOW = datetime(2030, 5, 1, tzinfo=UTC)
D1 = DeviceId("dev-000001")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[HomeLayout, ServerConfig, Registry, Path]]:
    layout = make_home(tmp_path / "home")
    config = load_config(layout.config)
    with Registry.open(layout.registry) as registry:
        create_batch(
            registry,
            layout,
            config,
            BatchRequest(count=4, out_dir=tmp_path / "lot", batch_id="lot-a"),
            now=NOW,
            actor="t",
        )
        yield layout, config, registry, tmp_path / "lot"


def test_list_and_show_counts(env: tuple[HomeLayout, ServerConfig, Registry, Path]) -> None:
    _, _, registry, _ = env
    (summary,) = list_batches(registry, NOW)
    assert summary.batch.batch_id == "lot-a"
    assert summary.counts["provisioned"] == 4 and summary.counts["total"] == 4
    later = show_batch(registry, "lot-a", NOW + timedelta(days=8))
    assert later.counts["token_expired"] == 4 and later.counts["provisioned"] == 0
    assert later.to_json()["counts"]["token_expired"] == 4
    with pytest.raises(UnknownBatch):
        show_batch(registry, "nope", NOW)


def test_export_has_no_secrets(env: tuple[HomeLayout, ServerConfig, Registry, Path]) -> None:
    _, _, registry, lot = env
    buf = io.StringIO()
    assert export_manifest(registry, "lot-a", buf) == 4
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert tuple(rows[0]) == EXPORT_COLUMNS
    original = list(csv.reader((lot / "manifest.csv").open()))
    # The same rows as the manifest written at creation, plus the state.
    assert [r[:3] for r in rows[1:]] == original[1:]
    assert {r[3] for r in rows[1:]} == {"provisioned"}
    for folder in lot.glob("dev-*"):
        assert (folder / "token").read_text() not in buf.getvalue()
    with pytest.raises(UnknownBatch):
        export_manifest(registry, "nope", io.StringIO())


def test_reissue_kills_the_old_token(env: tuple[HomeLayout, ServerConfig, Registry, Path]) -> None:
    layout, config, registry, lot = env
    old = (lot / "dev-000001" / "token").read_text()
    result = reissue_token(
        registry, layout, config, D1, ttl=timedelta(days=1), now=NOW, out_dir=lot, force=True
    )
    assert result.bundle == lot / "dev-000001"
    new = (lot / "dev-000001" / "token").read_text()
    assert new == result.token != old
    assert stat.S_IMODE((lot / "dev-000001" / "token").stat().st_mode) == 0o600
    registry.check_token(D1, hash_secret(new), NOW)
    with pytest.raises(TokenRejected) as info:
        registry.check_token(D1, hash_secret(old), NOW)
    assert info.value.reason == "used"
    device = registry.get_device(D1)
    assert device is not None and device.token_expires_at == NOW + timedelta(days=1)
    assert sorted(p.name for p in lot.iterdir() if p.name.startswith(".")) == []


def test_reissue_refusals(env: tuple[HomeLayout, ServerConfig, Registry, Path]) -> None:
    layout, config, registry, lot = env
    with pytest.raises(OutputDirError, match="--force"):
        reissue_token(registry, layout, config, D1, ttl=None, now=NOW, out_dir=lot)
    old = (lot / "dev-000001" / "token").read_text()
    registry.check_token(D1, hash_secret(old), NOW)  # the refusal changed nothing
    stdout_only = reissue_token(registry, layout, config, D1, ttl=None, now=NOW, out_dir=None)
    assert stdout_only.bundle is None
    registry.check_token(D1, hash_secret(stdout_only.token), NOW)
    registry.revoke_device(D1, reason="key-compromise", now=NOW, actor="t")
    with pytest.raises(ReissueRefused, match="revoked"):
        reissue_token(registry, layout, config, D1, ttl=None, now=NOW, out_dir=None, force=True)


def test_revoke_lot(env: tuple[HomeLayout, ServerConfig, Registry, Path]) -> None:
    _, _, registry, _ = env
    seen: list[tuple[str, int, int]] = []
    revoked = revoke_batch(
        registry,
        "lot-a",
        reason="key-compromise",
        now=NOW,
        actor="t",
        progress=lambda *a: seen.append(a),
    )
    assert revoked == 4
    assert seen and seen[0] == ("revoke", 4, 4)
    assert {d.state for d in registry.list_devices(batch_id="lot-a")} == {DeviceState.REVOKED}
    assert show_batch(registry, "lot-a", NOW).counts["revoked"] == 4
    with pytest.raises(UnknownBatch):
        revoke_batch(registry, "nope", reason="unspecified", now=NOW, actor="t")
