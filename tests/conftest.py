"""Shared fixtures: one fresh in-memory CA per test session."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.pki_helpers import MemoryCa, make_ca


@pytest.fixture(scope="session")
def ca() -> MemoryCa:
    return make_ca()


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
