"""Enrollment does not import the operator tooling: the service, the manufacturer trust and the
IDevID checks load without `provisioning` (which imports them, never the reverse). (The admin
API still creates batches through provisioning, so the server as a whole does.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_service_and_idevid_checks_do_not_import_provisioning() -> None:
    code = (
        "import sys\n"
        "import enroll_server.enrollment.service, enroll_server.enrollment.manufacturers\n"
        "import enroll_server.pki.birth_certificate, enroll_server.pki.client_identity\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'provisioning'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_mosquitto_sync_does_not_import_aiohttp() -> None:
    """The mosquitto sync process shares the CRL publisher with `fleetpki serve`, not its HTTP."""
    code = (
        "import sys\n"
        "import enroll_server.broker.mosquitto_sync, enroll_server.revocation.publisher\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout
