"""`fleetpki serve` with timers around the phases of an enrollment: `bench/enroll.py --phases`.

Where the server's CPU per enrollment goes, phase by phase, so BENCHMARKS.md can say which
part of the gap to the raw floor each one is. The timers are wall clock (perf_counter) around
calls on the loop thread; the bench pins the server to a core of its own, where wall time in
a call is its CPU time. Phases nest; the table says which holds which. Everything not inside
one of them (accepting, the TLS handshake, reading requests, the event loop) is the
remainder of the process's CPU time. The group commit runs in a worker thread (commit_queue's
writer), where wall time includes waiting for the WAL's sync: it is timed in that thread's CPU
time (time.thread_time) instead.

    python bench/phased_serve.py --phases-out OUT.json <fleetpki serve arguments>
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enroll_server.cli import main as cli_main
from enroll_server.enrollment.service import EnrollmentService
from enroll_server.est.front import EstConnection
from enroll_server.registry.issuance import IssuanceStore
from enroll_server.registry.tokens import TokenStore
from enroll_server.transport.tls_socket import TlsSocketTransport

# (name in the report, class, method); inner phases after the phase that holds them.
PHASES: tuple[tuple[str, type, str], ...] = (
    ("request: authorize, check, sign (EstConnection._serve)", EstConnection, "_serve"),
    ("  token check (authorize_token)", EnrollmentService, "authorize_token"),
    ("    registry read (check_token_holder)", TokenStore, "check_token_holder"),
    ("  CSR policy + sign + encode (EnrollmentService.issue)", EnrollmentService, "issue"),
    ("group commit (record_issuances, worker thread CPU)", IssuanceStore, "record_issuances"),
    ("reply once committed (EstConnection._committed)", EstConnection, "_committed"),
    ("  write, close_notify, close (write_last)", TlsSocketTransport, "write_last"),
)

spent: dict[str, list[float]] = {name: [0.0, 0] for name, _, _ in PHASES}


def _timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    clock = time.thread_time if method.__name__ == "record_issuances" else time.perf_counter
    slot = spent[name]

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return method(*args, **kwargs)
        finally:
            slot[0] += clock() - started
            slot[1] += 1

    return timed


def main() -> None:
    argv = sys.argv[1:]
    at = argv.index("--phases-out")
    out = Path(argv[at + 1])
    del argv[at : at + 2]
    for name, cls, attr in PHASES:
        setattr(cls, attr, _timed(name, getattr(cls, attr)))
    sys.argv = ["fleetpki", "serve", *argv]
    try:
        cli_main()
    finally:
        out.write_text(
            json.dumps({name: {"seconds": s, "calls": n} for name, (s, n) in spent.items()})
        )


if __name__ == "__main__":
    main()
