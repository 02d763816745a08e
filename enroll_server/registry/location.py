"""Where the registry lives: an SQLite file (the default) or a PostgreSQL database (a URL)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from enroll_server.registry.errors import InvalidValue

# fleetpki.toml `registry`, `--registry`, or this variable (highest precedence first:
# --registry, FLEETPKI_REGISTRY, fleetpki.toml, H/registry.db).
REGISTRY_ENV = "FLEETPKI_REGISTRY"
_POSTGRES_SCHEMES = ("postgresql", "postgres")
# user:password@ in a URL; a password=... keyword in a libpq conninfo string.
_URL_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SqliteLocation:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class PostgresLocation:
    """A libpq URL; the password comes from `password_file`, PGPASSWORD or libpq's passfile,
    and is never part of what str() shows (every message names the location by str())."""

    url: str
    password_file: Path | None = None

    def __str__(self) -> str:
        return redact(self.url)

    def password(self) -> str | None:
        """The password of `password_file` (first line), or None to let libpq find one."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise InvalidValue(
                "registry_password_file", str(self.password_file), f"unreadable: {exc}"
            ) from None


RegistryLocation = SqliteLocation | PostgresLocation


def redact(dsn: str) -> str:
    """`dsn` with any password replaced by ***: for every log line and error message."""
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", dsn))


def has_password(dsn: str) -> bool:
    return redact(dsn) != dsn


def parse_location(text: str, *, password_file: Path | None = None) -> RegistryLocation:
    """`postgresql://...` (or `postgres://`), `sqlite:///path`, or a plain file path."""
    scheme = text.split(":", 1)[0].lower() if "://" in text else ""
    if scheme in _POSTGRES_SCHEMES:
        return PostgresLocation(text, password_file)
    if scheme == "sqlite":
        path = unquote(urlsplit(text).path)
        if not path:
            raise InvalidValue(
                "registry", text, "an sqlite URL names a file: sqlite:///H/registry.db"
            )
        return SqliteLocation(Path(path))
    if scheme:
        raise InvalidValue(
            "registry", redact(text), "expected postgresql://..., sqlite:///FILE or a file path"
        )
    return SqliteLocation(Path(text))


def choose_location(
    default: Path,
    *,
    flag: str | None = None,
    configured: str | None = None,
    password_file: Path | None = None,
) -> RegistryLocation:
    """The registry a command uses: `--registry`, else FLEETPKI_REGISTRY, else fleetpki.toml's
    `registry`, else the home's SQLite file `default`."""
    for text in (flag, os.environ.get(REGISTRY_ENV), configured):
        if text:
            return parse_location(text, password_file=password_file)
    return SqliteLocation(default)
