"""The agent's process exit codes (documented in README and the systemd unit)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `fleetpki-agent` returns; systemd restarts on CRASH and BUSY, never on 3, 4, 5
    (RestartPreventExitStatus).

    0 OK        stopped on request (SIGTERM / Ctrl-C) or the command succeeded.
    1 CRASH     an unexpected error (a bug or the OS); restarting is the right reaction.
    2 USAGE     bad command line (argparse's own code).
    3 REFUSED   the service or the broker refused or revoked this device; restarting won't help.
                (A suspended device does not exit under `run`: it waits to be resumed.)
    4 CONFIG    agent.toml or the local state is unusable; the message names the file.
    5 REBOOTSTRAP  no valid certificate (expired, or never enrolled) and no token: the device
                   needs a new token from the operator.
    6 BUSY      another fleetpki-agent process uses the state folder (a running agent, or an
                `enroll`); nothing was changed. Stop it first. systemd retries a `run` later.
    """

    OK = 0
    CRASH = 1
    USAGE = 2
    REFUSED = 3
    CONFIG = 4
    REBOOTSTRAP = 5
    BUSY = 6
