"""The state folder's lock: one `fleetpki-agent` process at a time may use a device's identity.

`run` holds it for its whole life and `enroll` while it enrolls, so an `enroll --force` cannot
swap the identity under a running agent (nor its status.json, nor sweep a generation folder
the agent is writing). An flock(2) on `state/agent.lock`: the kernel releases it when the
process dies, however it dies, so a crash or SIGKILL never leaves a stale lock behind; the
file holds the holder's pid, for the message of whoever is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from device_agent.errors import AgentError

LOCK_FILE = "agent.lock"


class AgentBusy(AgentError):
    """Another process holds the state folder's lock (a running agent, or an enroll)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"fleetpki-agent process {pid}" if pid else "another fleetpki-agent process"
        super().__init__(
            f"{who} is using {path.parent} (it holds {path}); stop it first "
            "(e.g. `systemctl stop fleetpki-agent`), then run this command again"
        )
        self.path = path
        self.pid = pid


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class StateLock:
    """`acquire()` or AgentBusy; `release()` (also on process exit, by the kernel)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting. Creates the state folder (0700) if needed, so an
        unwritable one fails here (OSError), before anything is enrolled or spent."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise AgentBusy(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the process holding the lock (0 if it cannot be read), None if it is free.

    Read-only: a shared lock taken and dropped at once, the file never written.
    """
    try:
        fd = os.open(Path(state_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or 0
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
