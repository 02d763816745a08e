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
        "import enroll_server.service, enroll_server.manufacturers\n"
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
