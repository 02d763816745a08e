"""A throwaway SoftHSM2 configuration for tests that run fleetpki as processes: its own token
directory, tokens initialised with a PIN, and the environment that points the module at it.

Tests using it make every PKCS#11 call in a subprocess: a module reads SOFTHSM2_CONF once per
process, and the suite's process may have loaded it already with another (test_hsm_signer.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def softhsm_env(base: Path, pin: str, labels: tuple[str, ...] = ("fleet",)) -> dict[str, str]:
    """This process's environment without FLEETPKI_*, with SOFTHSM2_CONF naming a new token
    directory under `base` that holds one token per label, each with the user PIN `pin`."""
    tokens = base / "tokens"
    tokens.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPKI_")}
    environ["SOFTHSM2_CONF"] = str(conf)
    for label in labels:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--pin", pin, "--so-pin", "so-" + pin],
            check=True, capture_output=True, timeout=30, env=environ,
        )  # fmt: skip
    return environ
