"""A throwaway PostgreSQL 15 cluster on loopback for tests (and benchmarks) that need one.

`PgCluster.start(base)` runs initdb and pg_ctl from Debian's `postgresql` package (as the
`postgres` user when run as root: both refuse root), listening on 127.0.0.1 at a free port
and on a unix socket inside `base`; `stop()` stops it (fast, then immediate) and removes the
folder. `new_database()` gives each test a fresh database. The superuser `fleetpki` logs in
with a password (md5/scram over TCP) so tests can exercise wrong passwords; the unix socket
trusts everyone.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def _pg_bin() -> Path:
    """FLEETPKI_PG_BIN, else Debian's PostgreSQL 15, else the newest version installed."""
    if "FLEETPKI_PG_BIN" in os.environ:
        return Path(os.environ["FLEETPKI_PG_BIN"])
    preferred = Path("/usr/lib/postgresql/15/bin")
    if preferred.exists():
        return preferred
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else preferred


PG_BIN = _pg_bin()
START_TIMEOUT_S = 30
SUPERUSER = "fleetpki"
PASSWORD = "throwaway-test-password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    base: Path
    port: int
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "run"

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        """A TCP URL; without `password`, the caller supplies it (PGPASSWORD, a file)."""
        auth = f"{SUPERUSER}:{PASSWORD}" if password else SUPERUSER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, base: Path | None = None) -> PgCluster:
        root = Path(tempfile.mkdtemp(prefix="fleetpki-pg-", dir=base))
        root.chmod(0o755)
        cluster = cls(root, _free_port())
        try:
            cluster._initdb()
            cluster.pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(root / "log"))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _initdb(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.base / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self._chown(self.base, self.socket_dir, pwfile)
        self._run(
            PG_BIN / "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                # A throwaway cluster: durability buys nothing and costs the tests time.
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    def pg_ctl(self, *args: str) -> None:
        self._run(PG_BIN / "pg_ctl", "-D", str(self.data), *args)

    def restart(self) -> None:
        """Stop (fast: every session is cut off) and start again on the same port."""
        self.pg_ctl("stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT_S))
        self.pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.base / "log"))

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.pg_ctl("stop", "-m", "fast", "-w", "-t", "10")
            except RuntimeError:
                self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "10")
        shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ databases

    def new_database(self, prefix: str = "t", *, template: str | None = None) -> str:
        """A fresh database, empty or a copy of database `template` (which nobody may be
        connected to); its URL (with the password)."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._counter)}"
        like = f' TEMPLATE "{template}"' if template else ""
        # Over the unix socket, as the superuser: ~20 ms, where a psql process takes ~100.
        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
        ) as admin:
            admin.execute(f'CREATE DATABASE "{name}"{like}')  # type: ignore[arg-type]
        return self.url(name)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser over the unix socket; its output."""
        result = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                statement,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        return result.stdout.strip()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _as_postgres() -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _chown(self, *paths: Path) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam("postgres")
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *cmd: str | Path) -> None:
        started = time.monotonic()
        try:
            subprocess.run(
                [*self._as_postgres(), *map(str, cmd)],
                check=True,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 10,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} failed after {time.monotonic() - started:.1f} s: "
                f"{exc.stderr.strip() or exc.stdout.strip()}"
            ) from exc
