"""Shared fixtures: one fresh in-memory CA per test session."""

from __future__ import annotations

import pytest

from tests.pki_helpers import MemoryCa, make_ca


@pytest.fixture(scope="session")
def ca() -> MemoryCa:
    return make_ca()
