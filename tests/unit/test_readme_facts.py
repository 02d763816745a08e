"""Facts the README states that the code decides: keep them in step."""

from __future__ import annotations

from pathlib import Path

from enroll_server.pki.serial import RANDOM_BITS, new_serial

README = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())


def test_readme_says_what_a_serial_is() -> None:
    assert new_serial().bit_length() == 159
    assert "a 159-bit serial (a fixed top bit, 30 bits of the millisecond clock" in README
    assert f"then {RANDOM_BITS} random bits from the CSPRNG" in README
    assert "159-bit random" not in README  # 31 of the 159 bits are not random


def test_readme_says_how_to_reach_the_installed_commands() -> None:
    assert "source .venv/bin/activate" in README
    assert ".venv/bin/fleetpki" in README
