"""Batch creation on a real home and real SQLite: bundles, manifest, all or nothing."""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enroll_server.home.config import ServerConfig, load_config
from enroll_server.home.layout import HomeLayout, hash_secret
from enroll_server.registry import BatchKind, DuplicateBatch, Registry, TokenRejected
from fleetpki.identity import DeviceId
from provisioning.batch import MAX_IN_MEMORY, BatchRequest, create_batch, provision_batch
from provisioning.errors import (
    BundlesNotPublished,
    DeviceIdTaken,
    InvalidBatchOption,
    InvalidCount,
    OutputDirError,
    SerialListError,
)
from provisioning.manifest import COLUMNS
from tests.live_server import make_home

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Home:
    layout: HomeLayout
    config: ServerConfig
    registry: Registry

    def create(self, request: BatchRequest, **kw: object) -> object:
        return create_batch(
            self.registry, self.layout, self.config, request, now=NOW, actor="test", **kw
        )  # type: ignore[arg-type]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    layout = make_home(tmp_path / "home")
    with Registry.open(layout.registry) as registry:
        yield Home(layout, load_config(layout.config), registry)


def leftovers(parent: Path) -> list[str]:
    """Anything in the output's parent folder besides the home (staging folders included)."""
    return sorted(p.name for p in parent.iterdir() if p.name != "home")


def assert_no_batch(home: Home) -> None:
    assert home.registry.list_batches() == []
    assert home.registry.count_devices() == 0


def test_token_batch_bundles_manifest_and_registry(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    result = create_batch(
        home.registry,
        home.layout,
        home.config,
        BatchRequest(count=25, prefix="pi-", out_dir=out, token_ttl=timedelta(days=3)),
        now=NOW,
        actor="test",
    )
    assert result.count == 25 and result.kind is BatchKind.TOKEN
    assert result.token_expires_at == NOW + timedelta(days=3)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == COLUMNS
    assert [r[0] for r in rows[1:]] == [f"pi-{n:06d}" for n in range(1, 26)]
    assert {r[2] for r in rows[1:]} == {"2030-01-05T03:04:05Z"}
    manifest_text = (out / "manifest.csv").read_text()
    ca = home.layout.root_cert.read_bytes()
    for row in rows[1:]:
        folder = out / row[1]
        token = (folder / "token").read_text()
        assert len(token) >= 43  # 256 bits, URL-safe base64
        assert token not in manifest_text
        assert (folder / "ca.pem").read_bytes() == ca
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
        # The registry holds the hash only, bound to this very device.
        home.registry.check_token(DeviceId(row[0]), hash_secret(token), NOW)
    first_token = (out / "pi-000001" / "token").read_text()
    with pytest.raises(TokenRejected) as info:
        home.registry.check_token(DeviceId("pi-000002"), hash_secret(first_token), NOW)
    assert info.value.reason == "wrong-device"
    counts = home.registry.batch_counts(result.batch_id, NOW)
    assert counts["provisioned"] == 25
    assert (
        home.registry.batch_counts(result.batch_id, NOW + timedelta(days=4))["token_expired"] == 25
    )
    # Nothing but the published folder next to it: the staging folder is gone.
    assert leftovers(tmp_path) == ["lot"]


def test_in_memory_batch_for_the_admin_api(home: Home) -> None:
    result = provision_batch(
        home.registry,
        home.layout,
        home.config,
        count=5,
        prefix="api-",
        token_ttl=None,
        now=NOW,
        actor="admin-api",
    )
    assert result.out_dir is None and result.tokens is not None
    assert [t.device_id.value for t in result.tokens] == [f"api-{n:06d}" for n in range(1, 6)]
    assert result.token_expires_at == NOW + home.config.token_ttl
    for t in result.tokens:
        home.registry.check_token(t.device_id, hash_secret(t.token), NOW)
        assert t.token not in repr(t)
    data = result.to_json(include_tokens=True)
    assert len(data["tokens"]) == 5
    assert "tokens" not in result.to_json()
    with pytest.raises(InvalidBatchOption):
        provision_batch(
            home.registry,
            home.layout,
            home.config,
            count=MAX_IN_MEMORY + 1,
            prefix="api-",
            token_ttl=None,
            now=NOW,
            actor="admin-api",
        )


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("phase", ["bundles", "registry"])
def test_interrupt_midway_leaves_nothing(home: Home, tmp_path: Path, phase: str) -> None:
    def progress(p: str, done: int, total: int) -> None:
        if p == phase and done >= 500:
            raise Interrupt

    with pytest.raises(Interrupt):
        home.create(BatchRequest(count=600, out_dir=tmp_path / "lot"), progress=progress)
    assert_no_batch(home)
    assert leftovers(tmp_path) == []


def test_duplicate_serial_against_registry_named_by_line(home: Home, tmp_path: Path) -> None:
    home.create(BatchRequest(count=3, prefix="sn", out_dir=tmp_path / "first"))
    serials = tmp_path / "serials.csv"
    # The clash is deep in the list (the second insert chunk): every bundle was written (tar:
    # one file per device, to keep the test quick on a busy disk).
    lines = [f"new{n:05d}" for n in range(2100)] + ["sn000002"]
    serials.write_text("serial\n" + "\n".join(lines) + "\n")
    with pytest.raises(SerialListError) as info:
        home.create(BatchRequest(serials=serials, out_dir=tmp_path / "second", tar=True))
    assert (info.value.line, info.value.value) == (2102, "sn000002")
    assert "already registered" in str(info.value)
    assert len(home.registry.list_batches()) == 1
    assert home.registry.count_devices() == 3
    assert leftovers(tmp_path) == ["first", "serials.csv"]


def test_same_prefix_twice_is_refused_before_any_work(home: Home, tmp_path: Path) -> None:
    home.create(BatchRequest(count=10, out_dir=tmp_path / "a"))
    with pytest.raises(DeviceIdTaken, match="--start") as info:
        home.create(BatchRequest(count=10, out_dir=tmp_path / "b"))
    assert info.value.device_id == DeviceId("dev-000001")
    assert not (tmp_path / "b").exists()
    result = home.create(BatchRequest(count=10, start=11, out_dir=tmp_path / "b"))
    assert result.count == 10  # type: ignore[attr-defined]


def test_bad_serial_list_creates_nothing(home: Home, tmp_path: Path) -> None:
    serials = tmp_path / "serials.csv"
    serials.write_text("ok-1\nok-2\nbad id\n")
    with pytest.raises(SerialListError, match="line 3"):
        home.create(BatchRequest(serials=serials, out_dir=tmp_path / "lot"))
    assert_no_batch(home)
    assert leftovers(tmp_path) == ["serials.csv"]


@pytest.mark.parametrize("count", [0, -3, 10_000_001])
def test_bad_counts(home: Home, tmp_path: Path, count: int) -> None:
    with pytest.raises(InvalidCount):
        home.create(BatchRequest(count=count, out_dir=tmp_path / "lot"))
    assert_no_batch(home)
    assert leftovers(tmp_path) == []


def test_existing_non_empty_dir_needs_force(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    out.mkdir()
    (out / "README").write_text("factory notes")
    with pytest.raises(OutputDirError, match="not empty"):
        home.create(BatchRequest(count=3, out_dir=out))
    assert_no_batch(home)
    home.create(BatchRequest(count=3, out_dir=out, force=True))
    assert sorted(p.name for p in out.iterdir()) == [
        "README",
        "dev-000001",
        "dev-000002",
        "dev-000003",
        "manifest.csv",
    ]
    assert leftovers(tmp_path) == ["lot"]


def test_existing_empty_dir_is_fine(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "lot"
    out.mkdir(mode=0o755)
    home.create(BatchRequest(count=2, out_dir=out))
    assert (out / "dev-000002" / "token").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_unwritable_dir(home: Home, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot create"):
        home.create(BatchRequest(count=3, out_dir=blocker / "lot"))
    with pytest.raises(OutputDirError, match="not a folder"):
        home.create(BatchRequest(count=3, out_dir=blocker))
    assert_no_batch(home)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_parent(home: Home, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="cannot create"):
            home.create(BatchRequest(count=3, out_dir=parent / "lot"))
    finally:
        parent.chmod(0o700)
    assert_no_batch(home)


def test_duplicate_batch_id_and_bad_options(home: Home, tmp_path: Path) -> None:
    home.create(BatchRequest(count=1, batch_id="lot-a", out_dir=tmp_path / "a"))
    with pytest.raises(DuplicateBatch):
        home.create(BatchRequest(count=1, prefix="x-", batch_id="lot-a", out_dir=tmp_path / "b"))
    for bad in (
        BatchRequest(count=1, batch_id="../evil", out_dir=tmp_path / "c"),
        BatchRequest(count=1, device_key_type="dsa-1024", out_dir=tmp_path / "c"),
        BatchRequest(count=1, token_ttl=timedelta(days=400), out_dir=tmp_path / "c"),
        BatchRequest(count=1, serials=tmp_path / "s.csv", out_dir=tmp_path / "c"),
        BatchRequest(out_dir=tmp_path / "c"),
    ):
        with pytest.raises(InvalidBatchOption):
            home.create(bad)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert len(home.registry.list_batches()) == 1


def test_tar_bundles(home: Home, tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "lot"
    home.create(BatchRequest(count=3, out_dir=out, tar=True))
    assert sorted(p.name for p in out.iterdir()) == [
        "dev-000001.tar",
        "dev-000002.tar",
        "dev-000003.tar",
        "manifest.csv",
    ]
    with tarfile.open(out / "dev-000003.tar") as tar:
        names = sorted(tar.getnames())
    assert names == [
        "dev-000003",
        "dev-000003/agent.toml",
        "dev-000003/ca.pem",
        "dev-000003/token",
    ]
    rows = list(csv.reader((out / "manifest.csv").open()))
    assert rows[1][1] == "dev-000001.tar"


def test_failure_after_commit_keeps_the_bundles(home: Home, tmp_path: Path) -> None:
    """Once the registry holds the batch, the bundles are the only copy of live tokens: an
    interrupt while publishing keeps them and says where they are."""

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "registry" and done == 150:  # reported only after the commit
            raise Interrupt

    with pytest.raises(BundlesNotPublished) as info:
        home.create(BatchRequest(count=150, out_dir=tmp_path / "lot"), progress=progress)
    staging = info.value.staging
    assert str(staging) in str(info.value)
    assert home.registry.count_devices() == 150
    assert not (tmp_path / "lot").exists()
    token = (staging / "dev-000150" / "token").read_text()
    home.registry.check_token(DeviceId("dev-000150"), hash_secret(token), NOW)
    assert (staging / "manifest.csv").exists()
