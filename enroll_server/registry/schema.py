"""The registry's SQL schema as an ordered list of migrations, and the code that applies them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from enroll_server.registry.errors import NoSchema, SchemaTooNew, SchemaTooOld

if TYPE_CHECKING:
    from enroll_server.registry.connection import Sql
    from enroll_server.registry.postgres import PgConnection


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    # Separate statements, not one script: sqlite3's executescript() commits first, which
    # would break "all missing migrations in one transaction".
    statements: tuple[str, ...]
    # The same change on PostgreSQL; required from POSTGRES_BASELINE on (_check_order).
    postgresql: tuple[str, ...] = ()


_V1 = Migration(
    1,
    "devices, batches, tokens, certificates, audit, events, admin tokens, counters",
    (
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            device_count INTEGER NOT NULL DEFAULT 0,
            token_ttl_seconds INTEGER NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL CHECK (kind IN ('token', 'idevid'))
        )""",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('device', 'service')),
            batch_id TEXT REFERENCES batches(id),
            state TEXT NOT NULL
                CHECK (state IN ('provisioned', 'active', 'suspended', 'revoked')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            enrolled_at TEXT,
            token_expires_at TEXT
        )""",
        "CREATE INDEX devices_batch_state ON devices(batch_id, state)",
        "CREATE INDEX devices_state ON devices(state)",
        # The token itself is never stored, only SHA-256(token): a leaked registry file
        # must not let anyone enroll.
        """CREATE TABLE tokens (
            token_hash TEXT PRIMARY KEY,
            device_id TEXT NOT NULL REFERENCES devices(id),
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT
        )""",
        "CREATE INDEX tokens_device ON tokens(device_id)",
        # serial as lowercase hex TEXT: serials carry up to 159 random bits (RFC 5280 4.1.2.2
        # allows 20 octets), more than SQLite's 64-bit INTEGER; the PRIMARY KEY makes the
        # database itself enforce per-CA uniqueness.
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            device_id TEXT NOT NULL REFERENCES devices(id),
            fingerprint_sha256 TEXT NOT NULL UNIQUE,
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            issued_at TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('active', 'revoked', 'on_hold', 'superseded')),
            revoked_at TEXT,
            revocation_reason TEXT,
            pem TEXT NOT NULL
        )""",
        "CREATE INDEX certificates_device ON certificates(device_id)",
        # Serves revoked_entries() (CRL input): status IN (...) AND not_after > now.
        "CREATE INDEX certificates_status_expiry ON certificates(status, not_after)",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            device_id TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX audit_device ON audit(device_id, seq)",
        # Append-only, enforced by the database rather than by convention.
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused'); END""",
        # AUTOINCREMENT: seq never goes back, even after the newest row is deleted, so a
        # poller's "last seen seq" stays meaningful. Writers are serialized (BEGIN
        # IMMEDIATE), so seq order is commit order and a poller never skips a row.
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('revoked', 'suspended', 'resumed', 'issued')),
            device_id TEXT NOT NULL,
            serials TEXT NOT NULL DEFAULT '[]'
        )""",
        """CREATE TABLE admin_tokens (
            token_hash TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        # RFC 5280 5.2.3: cRLNumber is monotonically increasing; the first CRL gets 1.
        "INSERT INTO counters (name, value) VALUES ('crl_number', 0)",
    ),
)

# Fewer index pages per enrollment. An enrollment changes a device's state and inserts an
# active certificate; each index over a changed column costs a random page (or two: delete
# and insert) in the WAL at every commit, which was most of the registry's share of the
# server's CPU per enrollment (BENCHMARKS.md, "Enrollment"). So: the batch index no longer
# carries the state (batch views read a batch's rows anyway), the fleet-wide state index
# goes (state filters are operator queries that may scan), and the CRL's index is partial,
# holding only revoked and on-hold certificates, so an issuance never touches it.
_V2 = Migration(
    2,
    "indexes that an enrollment does not have to update",
    (
        "DROP INDEX devices_state",
        "DROP INDEX devices_batch_state",
        "CREATE INDEX devices_batch ON devices(batch_id)",
        "DROP INDEX certificates_status_expiry",
        # Serves revoked_entries() (CRL input): status IN (...) AND not_after > now.
        "CREATE INDEX certificates_revoked ON certificates(not_after) "
        "WHERE status IN ('revoked', 'on_hold')",
    ),
)

# The broker and the CRL publisher poll for revocation, suspension and resumption; since
# every issuance also writes an event, they would otherwise read (or scan past) thousands of
# 'issued' rows between two revocations. A partial index holds the other kinds only, so it
# costs an issuance nothing.
_V3 = Migration(
    3,
    "an index of the events revocation pollers read",
    ("CREATE INDEX events_changes ON events(seq) WHERE kind <> 'issued'",),
)

# The certificates table loses UNIQUE(fingerprint_sha256), and with it the index behind it.
# A fingerprint is SHA-256 over the DER, and the DER holds the serial, which the PRIMARY KEY
# already keeps unique per CA (RFC 5280 4.1.2.2): two rows with one fingerprint would need
# one serial, or a SHA-256 collision. Nothing looks certificates up by fingerprint. Yet the
# index cost every issuance a random B-tree page: with a 100,000-device fleet registered,
# 40 of the 95 us the group commit spent per enrollment (BENCHMARKS.md, "Enrollment").
# SQLite cannot drop a column constraint, so the table is rebuilt as
# https://www.sqlite.org/lang_altertable.html#otheralter describes; no table references
# certificates, so this is safe with foreign keys on.
_V4 = Migration(
    4,
    "no fingerprint index on certificates",
    (
        """CREATE TABLE certificates_v4 (
            serial TEXT PRIMARY KEY,
            device_id TEXT NOT NULL REFERENCES devices(id),
            fingerprint_sha256 TEXT NOT NULL,
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            issued_at TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('active', 'revoked', 'on_hold', 'superseded')),
            revoked_at TEXT,
            revocation_reason TEXT,
            pem TEXT NOT NULL
        )""",
        "INSERT INTO certificates_v4 (serial, device_id, fingerprint_sha256, not_before, "
        "not_after, issued_at, status, revoked_at, revocation_reason, pem) "
        "SELECT serial, device_id, fingerprint_sha256, not_before, not_after, issued_at, "
        "status, revoked_at, revocation_reason, pem FROM certificates ORDER BY rowid",
        "DROP TABLE certificates",
        "ALTER TABLE certificates_v4 RENAME TO certificates",
        "CREATE INDEX certificates_device ON certificates(device_id)",
        "CREATE INDEX certificates_revoked ON certificates(not_after) "
        "WHERE status IN ('revoked', 'on_hold')",
    ),
)

# One current certificate per identity (RFC 5280 5.3.1 reason superseded for the others).
# `fallback` names the certificate a renewal was made from, kept valid (status 'superseded')
# only until the renewal is first used (registry.certificates). Registries from before kept
# every superseded certificate valid, and a re-enrollment with a token left the old one
# active: this revokes, with reason superseded, every active certificate but the newest of
# its identity and every superseded one but the newest (which becomes the fallback of the
# active one), audits each, holds the fallback of suspended devices as suspension now holds
# every certificate, and lets events carry certificate-level revocations.
_V5 = Migration(
    5,
    "one current certificate per identity; certificate-level revocation events",
    (
        "ALTER TABLE certificates ADD COLUMN fallback TEXT",
        "CREATE TEMP TABLE migration_now AS SELECT strftime('%Y-%m-%dT%H:%M:%f000Z', 'now') AS now",
        # Every active certificate but the newest of its identity.
        "UPDATE certificates SET status = 'revoked', revocation_reason = 'superseded', "
        "revoked_at = (SELECT now FROM temp.migration_now) WHERE status = 'active' AND EXISTS ("
        "SELECT 1 FROM certificates AS n WHERE n.device_id = certificates.device_id "
        "AND n.status = 'active' AND (n.issued_at, n.serial) > "
        "(certificates.issued_at, certificates.serial))",
        # The newest superseded certificate becomes the fallback of the current one.
        "UPDATE certificates SET fallback = (SELECT s.serial FROM certificates AS s "
        "WHERE s.device_id = certificates.device_id AND s.status = 'superseded' "
        "ORDER BY s.issued_at DESC, s.serial DESC LIMIT 1) "
        "WHERE status IN ('active', 'on_hold')",
        "UPDATE certificates SET status = 'revoked', revocation_reason = 'superseded', "
        "revoked_at = (SELECT now FROM temp.migration_now) "
        "WHERE status = 'superseded' AND serial NOT IN "
        "(SELECT fallback FROM certificates WHERE fallback IS NOT NULL)",
        "UPDATE certificates SET status = 'on_hold', revocation_reason = 'certificateHold', "
        "revoked_at = (SELECT now FROM temp.migration_now) "
        "WHERE status = 'superseded' AND device_id IN "
        "(SELECT id FROM devices WHERE state = 'suspended')",
        "INSERT INTO audit (at, actor, action, device_id, detail) "
        "SELECT revoked_at, 'registry', 'certificate.supersede', device_id, "
        "json_object('serials', json_array(serial), 'reason', 'superseded', "
        "'why', 'schema 5: one current certificate per identity') "
        "FROM certificates WHERE status = 'revoked' "
        "AND revoked_at = (SELECT now FROM temp.migration_now) "
        "ORDER BY device_id, serial",
        "DROP TABLE temp.migration_now",
        # SQLite cannot change a CHECK constraint: rebuild events as _V4 rebuilt certificates,
        # keeping every seq and the AUTOINCREMENT high-water mark (pollers keep their place).
        """CREATE TABLE events_v5 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('revoked', 'suspended', 'resumed', 'issued',
                                               'cert_revoked', 'superseded')),
            device_id TEXT NOT NULL,
            serials TEXT NOT NULL DEFAULT '[]'
        )""",
        "INSERT INTO sqlite_sequence (name, seq) "
        "SELECT 'events_v5', seq FROM sqlite_sequence WHERE name = 'events'",
        "INSERT INTO events_v5 (seq, at, kind, device_id, serials) "
        "SELECT seq, at, kind, device_id, serials FROM events ORDER BY seq",
        "DROP TABLE events",
        "ALTER TABLE events_v5 RENAME TO events",
        "CREATE INDEX events_changes ON events(seq) WHERE kind <> 'issued'",
    ),
)

# Operator credentials with names and roles replace the anonymous admin tokens, so one can be
# listed, rotated and removed (a leaked token retired). Every admin token registered so far
# keeps working: the newest (what H/admin.token holds: serve registered each new file
# content) becomes operator 'admin', any older one 'admin-legacy-<n>', for the operator to
# remove. Tokens stay stored as SHA-256 only.
_V6 = Migration(
    6,
    "operator credentials: name, role (admin or viewer), token hash",
    (
        """CREATE TABLE operators (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
            token_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            rotated_at TEXT
        )""",
        "INSERT INTO operators (name, role, token_hash, created_at) "
        "SELECT CASE WHEN rowid = (SELECT max(rowid) FROM admin_tokens) THEN 'admin' "
        "ELSE 'admin-legacy-' || rowid END, 'admin', token_hash, created_at "
        "FROM admin_tokens ORDER BY rowid",
        "DROP TABLE admin_tokens",
    ),
)

# An IDevID lot is bound to the manufacturer whose CA made its birth certificates: the
# service refuses another trusted manufacturer's certificate naming the lot. Lots created
# before keep NULL (no binding recorded: any trusted manufacturer, as before).
_V7 = Migration(
    7,
    "the manufacturer of each IDevID lot",
    ("ALTER TABLE batches ADD COLUMN manufacturer TEXT",),
    postgresql=(),  # the baseline below creates schema 7 at once
)

# PostgreSQL registries start at schema 7: these statements create what SQLite's migrations 1
# to 7 leave, with the same tables, columns, checks and indexes, and the same SQL reads them
# (registry.postgres). Differences, each for a reason: seq columns are identity columns
# (BY DEFAULT, so that `fleetpki registry copy` keeps every seq); tokens carry an explicit
# `rowid` (SQLite's implicit one, which the token index reads in slices); the audit log is
# append-only through a trigger that refuses UPDATE, DELETE and TRUNCATE to every role the
# application may use. Every migration after 7 carries its own `postgresql` statements.
POSTGRES_BASELINE = 7
_POSTGRES_V7: tuple[str, ...] = (
    """CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        device_count INTEGER NOT NULL DEFAULT 0,
        token_ttl_seconds BIGINT NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL CHECK (kind IN ('token', 'idevid')),
        manufacturer TEXT
    )""",
    """CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('device', 'service')),
        batch_id TEXT REFERENCES batches(id),
        state TEXT NOT NULL
            CHECK (state IN ('provisioned', 'active', 'suspended', 'revoked')),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        enrolled_at TEXT,
        token_expires_at TEXT
    )""",
    "CREATE INDEX devices_batch ON devices(batch_id)",
    """CREATE TABLE tokens (
        rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,
        token_hash TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT
    )""",
    "CREATE INDEX tokens_device ON tokens(device_id)",
    """CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        fingerprint_sha256 TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('active', 'revoked', 'on_hold', 'superseded')),
        revoked_at TEXT,
        revocation_reason TEXT,
        pem TEXT NOT NULL,
        fallback TEXT
    )""",
    "CREATE INDEX certificates_device ON certificates(device_id)",
    "CREATE INDEX certificates_revoked ON certificates(not_after) "
    "WHERE status IN ('revoked', 'on_hold')",
    """CREATE TABLE audit (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device_id TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX audit_device ON audit(device_id, seq)",
    """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         RAISE EXCEPTION 'audit log is append-only: % refused', TG_OP
           USING ERRCODE = 'integrity_constraint_violation';
       END $$""",
    "CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
    "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
    """CREATE TABLE events (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('revoked', 'suspended', 'resumed', 'issued',
                                           'cert_revoked', 'superseded')),
        device_id TEXT NOT NULL,
        serials TEXT NOT NULL DEFAULT '[]'
    )""",
    "CREATE INDEX events_changes ON events(seq) WHERE kind <> 'issued'",
    # Every node listens (registry/notify.py): a change reaches all of them at its commit.
    """CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         PERFORM pg_notify('fleetpki_events', '');
         RETURN NULL;
       END $$""",
    "CREATE TRIGGER events_changed AFTER INSERT ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_notify()",
    """CREATE TABLE operators (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        rotated_at TEXT
    )""",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO counters (name, value) VALUES ('crl_number', 0)",
)

# Web console sessions in the registry, not in one process's memory: any node answers any
# click of a session (no sticky sessions) and a restart logs nobody out. Keyed by the
# SHA-256 of the session id; the operator's token hash binds the session to the token it was
# opened with (a rotation or removal ends it).
_CONSOLE_SESSIONS = """CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    operator_name TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_seen TEXT NOT NULL
)"""
_V8 = Migration(
    8,
    "web console sessions",
    (_CONSOLE_SESSIONS,),
    postgresql=(_CONSOLE_SESSIONS,),
)

# Several issuing CAs live at once after `fleetpki ca rollover` (home/issuers.py): each
# certificate records the one that signed it, by its SubjectKeyIdentifier (lowercase hex, the
# certificate's AuthorityKeyIdentifier), so that each issuer's CRL lists only its own
# certificates (RFC 5280 5.1.2.3) and OCSP answers "unknown" for another issuer's serial
# (RFC 6960 4.1.1 CertID). NULL: issued before the column existed, by the home's only issuing
# CA then; the first rollover fills them in with that CA's identifier.
_ISSUER_COLUMN = "ALTER TABLE certificates ADD COLUMN issuer_key_id TEXT"
_V9 = Migration(
    9,
    "the issuing CA of each certificate",
    (_ISSUER_COLUMN,),
    postgresql=(_ISSUER_COLUMN,),
)

# The CA state every node of a shared registry follows (registry/ca_state.py,
# home/ca_state.py): each `fleetpki ca rollover`, `ca revoke-issuing`, retirement and
# `ca rollover-root` records the home's CA files as one numbered generation, which every
# other node adopts into its own home. `state` is JSON: certificates, CRLs, keys only as the
# home stores them (encrypted under the CA passphrase) or a PKCS#11 URI; never a clear key.
_CA_STATES = """CREATE TABLE ca_states (
    generation INTEGER PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    state TEXT NOT NULL
)"""
_V10 = Migration(
    10,
    "the CA state nodes share",
    (_CA_STATES,),
    postgresql=(
        _CA_STATES,
        # Nodes hear of a new generation at its commit, as of a revocation (registry/notify.py
        # CA_STATE_PAYLOAD: only the CA state followers wake).
        """CREATE FUNCTION ca_states_notify() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             PERFORM pg_notify('fleetpki_events', 'ca_state');
             RETURN NULL;
           END $$""",
        "CREATE TRIGGER ca_states_changed AFTER INSERT ON ca_states "
        "FOR EACH STATEMENT EXECUTE FUNCTION ca_states_notify()",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10)
LATEST_VERSION = MIGRATIONS[-1].version


def _check_order() -> None:
    for expected, migration in enumerate(MIGRATIONS, start=1):
        if migration.version != expected:
            raise AssertionError(f"migration {migration.version} is out of order")
        if migration.version > POSTGRES_BASELINE and not migration.postgresql:
            raise AssertionError(
                f"migration {migration.version} has no PostgreSQL statements (`postgresql=`)"
            )


_check_order()


def current_version(conn: Sql) -> int:
    """The schema version of the open database; 0 for a fresh file."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        if isinstance(conn, sqlite3.Connection)
        else "SELECT to_regclass('schema_version')"
    ).fetchone()
    if exists is not None and exists[0] is None:
        exists = None
    if exists is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Apply every missing migration; the caller holds an open write transaction.

    Returns (version before, version after). Raises SchemaTooNew for a file from a newer
    fleetpki, before touching anything.
    """
    before = current_version(conn)
    if before > LATEST_VERSION:
        raise SchemaTooNew(before, LATEST_VERSION)
    if before == 0:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
        )
    for migration in MIGRATIONS[before:]:
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) "
            "VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (migration.version,),
        )
    return before, LATEST_VERSION


def migrate_postgres(conn: PgConnection, where: str, *, create: bool, upgrade: bool) -> int:
    """Check a PostgreSQL registry's schema, creating or upgrading it only when asked; the
    caller holds an open write transaction (the write lock: two nodes never migrate at once).

    `create`: make the schema in a database without one (else NoSchema). `upgrade`: apply
    missing migrations (else SchemaTooOld: a node never migrates a shared registry by itself).
    A newer schema is SchemaTooNew either way. Returns the version found.
    """
    before = current_version(conn)
    if before > LATEST_VERSION:
        raise SchemaTooNew(before, LATEST_VERSION)
    if before == 0 and not create:
        raise NoSchema(where)
    if 0 < before < LATEST_VERSION and not upgrade:
        raise SchemaTooOld(where, before, LATEST_VERSION)
    if before == 0:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
        )
        steps: list[tuple[int, tuple[str, ...]]] = [(POSTGRES_BASELINE, _POSTGRES_V7)]
    else:
        steps = []
    start = max(before, POSTGRES_BASELINE)
    steps += [(m.version, m.postgresql) for m in MIGRATIONS[start:]]
    for version, statements in steps:
        for statement in statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) "
            "VALUES (?, to_char(clock_timestamp() AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\'))',
            (version,),
        )
    return before
