"""A commit of the SQLite registry is on disk before it returns (PRAGMA synchronous = FULL): a
certificate handed to a device, or a revocation confirmed to an operator, survives a power cut,
not only a kill of the process (issue 18, kill -9 campaign; BENCHMARKS.md, Faults).

Seen with strace(1): the process commits two writes, saying so on stderr after each, then dies
without closing anything (os._exit: no checkpoint at close). The WAL must have been synced
between the two words. (The first write of a fresh WAL syncs its header whatever the setting;
with synchronous = NORMAL the second commit is synced only at the next checkpoint.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import os, sys
from datetime import UTC, datetime
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
registry = Registry.open(sys.argv[1])
registry.add_device(DeviceId("durable-1"), batch_id=None, now=datetime.now(UTC), actor="test")
os.write(2, b"FIRST\\n")
registry.add_device(DeviceId("durable-2"), batch_id=None, now=datetime.now(UTC), actor="test")
os.write(2, b"COMMITTED\\n")
os._exit(0)
"""


def test_a_commit_is_synced_to_disk_before_it_returns(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace(1) is needed (.ci/run installs Debian's strace)")
    db = tmp_path / "registry.db"
    subprocess.run(  # the schema first, in a process of its own
        [sys.executable, "-c", "import sys; from enroll_server.registry import Registry; "
         "Registry.open(sys.argv[1]).close()", str(db)],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    trace = tmp_path / "trace"
    subprocess.run(
        [strace, "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,write",
         sys.executable, "-c", WRITER, str(db)],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
        capture_output=True,
    )  # fmt: skip
    lines = trace.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "FIRST" in line)
    said = next(i for i, line in enumerate(lines) if "COMMITTED" in line)
    synced = [
        line
        for line in lines[first:said]
        if re.search(r"f(data)?sync\(\d+<[^>]*registry\.db-wal>", line)
    ]
    assert synced, "the commit returned before the WAL was synced:\n" + "\n".join(lines[-30:])
