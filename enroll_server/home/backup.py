"""`fleetpki backup` and `fleetpki restore`: a home and a consistent copy of its registry in one
file, and a new home from it.

The file is a gzip'd tar holding the home's files (fleetpki.toml, ca/, tls/, the admin token,
manufacturer trust, password and PIN files: it holds CA keys, so it is written 0600, atomically)
and the registry as of one moment: SQLite's online backup API (a consistent snapshot while
servers keep writing, sqlite3.Connection.backup) as `registry.db`, or for PostgreSQL
`pg_dump --format=custom` (one transaction: a consistent snapshot) as `registry.pgdump`. A
`backup.json` first in the file says what it holds. Restore writes nothing until the whole
file has been read and checked, into a staging folder renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from enroll_server.home.config import load_config, render_config
from enroll_server.home.layout import HomeError, HomeLayout, registry_location
from enroll_server.registry.location import PostgresLocation, SqliteLocation
from fleetpki.atomic_file import atomic_writer, make_private_dir, write_atomic

MANIFEST = "backup.json"
SQLITE_MEMBER = "registry.db"
PG_MEMBER = "registry.pgdump"
FORMAT = 1
# The registry's own files are in the file as its snapshot, never as they lie on disk.
_SKIP = {"registry.db", "registry.db-wal", "registry.db-shm", "registry.db-journal"}


class BackupError(Exception):
    """A backup or restore that cannot be done; names the file and why. Nothing was written."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True, slots=True)
class BackupSummary:
    path: Path
    files: int
    registry: str  # "sqlite" or "postgresql"


def _pg_env(location: PostgresLocation) -> dict[str, str]:
    """libpq's environment for pg_dump/pg_restore: the URL's parts (pg_restore reads a URL
    given as --dbname as a database name when it reconnects) and the password, which goes to
    the child's environment, never its command line."""
    from psycopg.conninfo import conninfo_to_dict

    env = dict(os.environ)
    parts = conninfo_to_dict(location.url)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("dbname", "PGDATABASE"), ("password", "PGPASSWORD")):  # fmt: skip
        if parts.get(key) is not None:
            env[var] = str(parts[key])
    password = location.password()
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def _pg_tool(name: str) -> str:
    """The newest installed PostgreSQL's own binary (Debian keeps them per version; the
    wrapper on PATH picks a version by its own rules), else the one on PATH."""
    versions = Path("/usr/lib/postgresql").glob(f"*/bin/{name}")
    for candidate in sorted(
        versions,
        key=lambda p: int(
            "0" + p.parts[-3].split(".")[0].strip() if p.parts[-3].split(".")[0].isdigit() else "0"
        ),
        reverse=True,
    ):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise BackupError(Path(name), f"{name} not found (Debian: apt install postgresql-client)")


def backup_home(home: Path, out: Path, now: datetime) -> BackupSummary:
    layout = HomeLayout(home)
    if not layout.config.exists():
        raise HomeError(home, "not initialized: nothing to back up")
    location = registry_location(layout)
    with tempfile.TemporaryDirectory(prefix="fleetpki-backup-") as scratch:
        snapshot = Path(scratch) / "registry"
        if isinstance(location, SqliteLocation):
            kind, member = "sqlite", SQLITE_MEMBER
            source = sqlite3.connect(f"file:{location.path}?mode=ro", uri=True)
            target = sqlite3.connect(snapshot)
            try:
                source.backup(target)
            except sqlite3.Error as exc:
                raise BackupError(location.path, f"registry snapshot failed: {exc}") from exc
            finally:
                target.close()
                source.close()
        else:
            assert isinstance(location, PostgresLocation)
            kind, member = "postgresql", PG_MEMBER
            done = subprocess.run(
                [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(snapshot)],
                env=_pg_env(location), capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise BackupError(Path(str(location)), f"pg_dump failed: {done.stderr.strip()}")
        files = [
            p
            for p in sorted(layout.root.rglob("*"))
            if p.is_file() and p.relative_to(layout.root).parts[0] not in _SKIP
        ]
        manifest = {
            "format": FORMAT,
            "created_at": now.isoformat(),
            "registry": kind,
            "files": [str(p.relative_to(layout.root)) for p in files],
        }
        with atomic_writer(out) as stream, tarfile.open(fileobj=stream, mode="w:gz") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(data), 0o600, int(now.timestamp())
            tar.addfile(info, io.BytesIO(data))
            tar.add(snapshot, arcname=member, recursive=False)
            for path in files:
                tar.add(path, arcname="home/" + str(path.relative_to(layout.root)))
    return BackupSummary(out, len(files), kind)


def restore_home(archive: Path, home: Path, registry_url: str | None = None) -> BackupSummary:
    """A new home at `home` (absent or empty) from `archive`. A PostgreSQL backup is restored
    into `registry_url` (an empty database), or the URL in its fleetpki.toml."""
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise BackupError(home, "exists and is not empty: restore writes a home only afresh")
    staging = home.with_name(home.name + ".restoring")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                manifest, members = _read(archive, tar)
                make_private_dir(staging)
                for member in members:
                    # filter="data": no absolute paths, no "..", no links out, no devices.
                    tar.extract(member, staging / "extract", filter="data")
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BackupError(archive, f"not a readable fleetpki backup ({exc})") from None
        extracted = staging / "extract"
        root = staging / "home"
        (extracted / "home").rename(root)
        for folder in (root, *(p for p in root.rglob("*") if p.is_dir())):
            os.chmod(folder, 0o700)  # as `init` makes them (the tar holds files only)
        kind = manifest["registry"]
        if kind == "sqlite":
            (extracted / SQLITE_MEMBER).rename(root / SQLITE_MEMBER)
        else:
            location = registry_location(HomeLayout(root))
            if registry_url is not None:
                location = PostgresLocation(registry_url, getattr(location, "password_file", None))
            if not isinstance(location, PostgresLocation):
                raise BackupError(archive, "a PostgreSQL backup needs --registry postgresql://...")
            done = subprocess.run(
                [_pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--single-transaction",
                 "--dbname", _pg_env(location)["PGDATABASE"], str(extracted / PG_MEMBER)],
                env=_pg_env(location), capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise BackupError(archive, f"pg_restore failed: {done.stderr.strip()}")
            if registry_url is not None:
                # The restored home serves from the database it was restored into.
                layout = HomeLayout(root)
                config = dataclasses.replace(load_config(layout.config), registry=registry_url)
                write_atomic(layout.config, render_config(config).encode(), 0o600)
        shutil.rmtree(extracted)
        if home.exists():
            home.rmdir()
        root.rename(home)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BackupSummary(archive, len(manifest["files"]), kind)


def _read(archive: Path, tar: tarfile.TarFile) -> tuple[dict[str, Any], list[tarfile.TarInfo]]:
    """The manifest and the members, checked against it before anything is extracted."""
    members = tar.getmembers()  # reads the whole file: a truncated one fails here
    names = {m.name for m in members}
    if not members or members[0].name != MANIFEST:
        raise BackupError(archive, f"no {MANIFEST} first: not a fleetpki backup")
    stream = tar.extractfile(members[0])
    try:
        manifest = json.loads(stream.read() if stream else b"")
    except ValueError as exc:
        raise BackupError(archive, f"{MANIFEST} unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("registry") not in ("sqlite", "postgresql"):
        raise BackupError(archive, f"unknown backup format {manifest.get('format')!r}")
    member = SQLITE_MEMBER if manifest["registry"] == "sqlite" else PG_MEMBER
    missing = [f for f in ["home/" + f for f in manifest["files"]] + [member] if f not in names]
    if missing or "home/fleetpki.toml" not in names:
        raise BackupError(archive, f"incomplete: {', '.join(missing[:3]) or 'fleetpki.toml'}")
    for m in members[1:]:
        m.mode = 0o600 if m.isfile() else 0o700
    return manifest, members[1:]
