"""Registry part for operator credentials: names, roles and token hashes (never the tokens)."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from enroll_server.registry.codec import parse_ts, ts
from enroll_server.registry.connection import RegistryBase, parse_enum
from enroll_server.registry.errors import (
    DuplicateOperator,
    InvalidValue,
    LastAdmin,
    UnknownOperator,
)
from enroll_server.registry.models import (
    Operator,
    OperatorCredential,
    OperatorRole,
    check_sha256_hex,
)
from fleetpki.identity import is_valid_id


def check_operator_name(name: str) -> str:
    """Operator names follow the id grammar (letters, digits, '-', '_'; at most 64)."""
    if not isinstance(name, str) or not is_valid_id(name):
        raise InvalidValue(
            "operator name",
            name,
            "letters, digits, '-' and '_' only, starting with a letter or digit, at most 64",
        )
    return name


def _credential(row: tuple[str, str, str, str | None, str]) -> OperatorCredential:
    name, role, created, rotated, token_hash = row
    operator = Operator(
        name,
        parse_enum(OperatorRole, "operator role", role),
        parse_ts(created),
        parse_ts(rotated) if rotated else None,
    )
    return OperatorCredential(operator, token_hash)


class OperatorStore(RegistryBase):
    """Operator credentials for the admin API. Every running server reads them at each
    request (no cache), so a removal or rotation by any process takes effect at the next one."""

    def add_operator(
        self, name: str, role: OperatorRole, token_hash: str, now: datetime, *, actor: str
    ) -> Operator:
        check_operator_name(name)
        check_sha256_hex("operator token hash", token_hash)
        role = parse_enum(OperatorRole, "operator role", str(role))
        now_s = ts(now, "now")
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO operators (name, role, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (name, role.value, token_hash, now_s),
                )
            except sqlite3.IntegrityError as exc:
                if "operators.name" in str(exc):
                    raise DuplicateOperator(name) from exc
                raise InvalidValue(
                    "operator token", name, "that token is already registered"
                ) from exc
            self._audit(
                conn, now_s, actor, "operator.add", None, {"name": name, "role": role.value}
            )
        return Operator(name, role, now, None)

    def rotate_operator(self, name: str, token_hash: str, now: datetime, *, actor: str) -> None:
        """Replace the operator's token: the old one is refused from this commit on."""
        check_sha256_hex("operator token hash", token_hash)
        now_s = ts(now, "now")
        with self._write() as conn:
            try:
                changed = conn.execute(
                    "UPDATE operators SET token_hash = ?, rotated_at = ? WHERE name = ?",
                    (token_hash, now_s, name),
                ).rowcount
            except sqlite3.IntegrityError as exc:
                raise InvalidValue(
                    "operator token", name, "that token is already registered"
                ) from exc
            if not changed:
                raise UnknownOperator(name)
            self._audit(conn, now_s, actor, "operator.rotate", None, {"name": name})

    def remove_operator(self, name: str, now: datetime, *, actor: str) -> None:
        """Delete the operator; refused for the last admin (LastAdmin)."""
        now_s = ts(now, "now")
        with self._write() as conn:
            row = conn.execute("SELECT role FROM operators WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownOperator(name)
            if row[0] == OperatorRole.ADMIN.value:
                admins = conn.execute(
                    "SELECT count(*) FROM operators WHERE role = 'admin'"
                ).fetchone()[0]
                if admins <= 1:
                    raise LastAdmin(name)
            conn.execute("DELETE FROM operators WHERE name = ?", (name,))
            self._audit(conn, now_s, actor, "operator.remove", None, {"name": name})

    def operator_credentials(self) -> list[OperatorCredential]:
        """Every operator with its token hash, by name (authentication compares them all)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, role, created_at, rotated_at, token_hash FROM operators ORDER BY name"
            ).fetchall()
        return [_credential(r) for r in rows]

    def list_operators(self) -> list[Operator]:
        return [c.operator for c in self.operator_credentials()]
