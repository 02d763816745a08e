"""Shared fixtures: one fresh in-memory CA per test session; one throwaway PostgreSQL cluster per
session (started by the first test that asks for it), a fresh database per test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_cluster import PgCluster
from tests.pki_helpers import MemoryCa, make_ca


@pytest.fixture(scope="session")
def ca() -> MemoryCa:
    return make_ca()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL 15 cluster on 127.0.0.1 (tests/pg_cluster.py), stopped and removed after."""
    cluster = PgCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database of the session's cluster (its URL carries the password)."""
    return pg_cluster.new_database()


@pytest.fixture(scope="session")
def pg_registry_template(pg_cluster: PgCluster) -> str:
    """The name of a database holding an empty fleetpki registry, to copy for each test."""
    from enroll_server.registry import Registry

    url = pg_cluster.new_database("registry_template")
    Registry.open(url, create=True).close()
    return url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a registry test opens its registry: an SQLite file, then a PostgreSQL database
    with fleetpki's schema (the same test runs on both backends)."""
    if request.param == "sqlite":
        return tmp_path / "registry.db"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database(template=request.getfixturevalue("pg_registry_template"))


@pytest.fixture
def live_server(tmp_path):  # type: ignore[no-untyped-def]
    """A real service (EST over HTTPS, admin API, CRL/OCSP over HTTP) on 127.0.0.1:0."""
    from tests.live_server import start_live_server

    server = start_live_server(tmp_path / "home")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_stack(tmp_path):  # type: ignore[no-untyped-def]
    """The whole service as `fleetpki serve` runs it: EST, admin API, CRL/OCSP and the broker."""
    from tests.live_server import start_live_server

    server = start_live_server(tmp_path / "home", broker=True)
    try:
        yield server
    finally:
        server.stop()


_QUIETED = ("fleetpki", "fleetpki.agent", "fleetpki.simulator", "enroll_server", "asyncio", "amqtt")


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Commands run in-process (the simulator's quiet_logging) set logger levels globally;
    put them back so a later test's caplog still sees what it looks for."""
    saved = {name: logging.getLogger(name).level for name in _QUIETED}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
