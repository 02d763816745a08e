"""Copying a whole registry into an empty one (SQLite to PostgreSQL, or back), verified."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from enroll_server.registry.connection import Sql
from enroll_server.registry.errors import CopyMismatch, TargetNotEmpty
from enroll_server.registry.store import Registry

# Every table with fleet data, its key (the copy's and the checksum's order) and its columns,
# in an order that satisfies the foreign keys. schema_version is not copied: the target
# has its own, at the same version (Registry.open migrated both). console_sessions is not
# copied either: a moved fleet's operators log in again on the new registry.
TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "batches",
        "id",
        ("id", "created_at", "device_count", "token_ttl_seconds", "note", "kind", "manufacturer"),
    ),
    (
        "devices",
        "id",
        (
            "id",
            "role",
            "batch_id",
            "state",
            "created_at",
            "updated_at",
            "enrolled_at",
            "token_expires_at",
        ),
    ),
    # rowid: SQLite's implicit one, PostgreSQL's explicit column (the token index reads it).
    (
        "tokens",
        "rowid",
        ("rowid", "token_hash", "device_id", "created_at", "expires_at", "used_at"),
    ),
    (
        "certificates",
        "serial",
        (
            "serial",
            "device_id",
            "fingerprint_sha256",
            "not_before",
            "not_after",
            "issued_at",
            "status",
            "revoked_at",
            "revocation_reason",
            "pem",
            "fallback",
            "issuer_key_id",
        ),
    ),
    ("audit", "seq", ("seq", "at", "actor", "action", "device_id", "detail")),
    ("events", "seq", ("seq", "at", "kind", "device_id", "serials")),
    ("operators", "name", ("name", "role", "token_hash", "created_at", "rotated_at")),
    ("counters", "name", ("name", "value")),
    ("ca_states", "generation", ("generation", "recorded_at", "state")),
)
# Sequence-like columns whose next value must follow the copied rows on PostgreSQL.
_IDENTITIES = (("tokens", "rowid"), ("audit", "seq"), ("events", "seq"))
_CHUNK = 2000
_MOD = 2**256


@dataclass(frozen=True, slots=True)
class TableSum:
    """A table's row count and checksum: the sum, mod 2**256, of SHA-256 over each row (as
    one JSON array). Order-free: the two backends may sort text keys differently."""

    table: str
    rows: int
    sha256: str


def _rows(conn: Sql, table: str, key: str, columns: tuple[str, ...]) -> Iterator[list[object]]:
    """Every row in key order, read in chunks (keyset pagination: each read is an index range)."""
    listed = ", ".join(columns)
    last: object = None
    position = columns.index(key)
    while True:
        after = "" if last is None else f"WHERE {key} > ? "
        rows = conn.execute(
            f"SELECT {listed} FROM {table} {after}ORDER BY {key} LIMIT {_CHUNK}",  # noqa: S608
            () if last is None else (last,),
        ).fetchall()
        yield from (list(r) for r in rows)
        if len(rows) < _CHUNK:
            return
        last = rows[-1][position]


def table_sums(registry: Registry) -> list[TableSum]:
    """Count and checksum of every copied table (the same on both backends for the same data)."""
    sums = []
    with registry._read() as conn:
        for table, key, columns in TABLES:
            total = 0
            count = 0
            for row in _rows(conn, table, key, columns):
                line = json.dumps(row, separators=(",", ":")).encode()
                total = (total + int.from_bytes(hashlib.sha256(line).digest())) % _MOD
                count += 1
            sums.append(TableSum(table, count, f"{total:064x}"))
    return sums


def copy_registry(
    source: Registry, target: Registry, progress: Callable[[str, int], None] | None = None
) -> list[TableSum]:
    """Copy every row of `source` into the empty `target` in one target transaction, then
    check counts and checksums table by table; the verified sums.

    Raises TargetNotEmpty (nothing written) if the target holds any device, token,
    certificate, batch, audit entry, event or operator; CopyMismatch if a table differs
    afterwards. Run it with no server writing to `source`.
    """
    with target._write() as out:
        for table, _, _ in TABLES:
            if table == "counters":
                continue
            rows = int(out.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            if rows:
                raise TargetNotEmpty(str(target.location), table, rows)
        out.execute("DELETE FROM counters")
        with source._read() as src:
            for table, key, columns in TABLES:
                insert = (
                    f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
                    f"VALUES ({', '.join('?' for _ in columns)})"
                )
                batch: list[list[object]] = []
                copied = 0
                for row in _rows(src, table, key, columns):
                    batch.append(row)
                    if len(batch) == _CHUNK:
                        out.executemany(insert, batch)
                        copied += len(batch)
                        batch = []
                if batch:
                    out.executemany(insert, batch)
                    copied += len(batch)
                if progress is not None:
                    progress(table, copied)
        if target.shared:
            for table, column in _IDENTITIES:
                out.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "  # noqa: S608
                    f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
                )
    expected = table_sums(source)
    for want, got in zip(expected, table_sums(target), strict=True):
        if want != got:
            raise CopyMismatch(
                want.table,
                f"source {want.rows} rows sum {want.sha256[:16]}, "
                f"target {got.rows} rows sum {got.sha256[:16]}",
            )
    return expected
