"""pyproject.toml uses the PEP 639 license field (an SPDX expression), which setuptools >= 77
reads without the deprecation warning `license = { text = ... }` printed on every install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    classifiers = PYPROJECT["project"].get("classifiers", [])
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639 forbids both


def test_build_backend_is_new_enough_for_it() -> None:
    (requirement,) = [r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r]
    found = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement.replace(" ", ""))
    assert found and int(found.group(1)) >= 77, requirement
