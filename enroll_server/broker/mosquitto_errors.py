"""The errors of running mosquitto as fleetpki's broker (config, dynsec control, sync)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MosquittoError(Exception):
    """Base of the errors raised while configuring or syncing mosquitto."""


class MosquittoNotRunning(MosquittoError):
    """No mosquitto process to signal: the pid (file) is missing or stale."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"cannot signal mosquitto ({what}): {why}")
        self.what = what
        self.why = why


class DynsecUnavailable(MosquittoError):
    """The dynamic-security control channel cannot be reached or does not answer."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"mosquitto dynsec control at {host}:{port}: {why}")
        self.host = host
        self.port = port
        self.why = why


class DynsecCommandFailed(MosquittoError):
    """A dynsec command that mosquitto answered with an error."""

    def __init__(self, command: str, username: str, error: str) -> None:
        super().__init__(f"dynsec {command} {username!r} failed: {error}")
        self.command = command
        self.username = username
        self.error = error


class PluginNotFound(MosquittoError):
    """mosquitto_dynamic_security.so is not where packages install it."""

    def __init__(self, searched: Sequence[Path]) -> None:
        places = ", ".join(str(p) for p in searched)
        super().__init__(
            f"mosquitto_dynamic_security.so not found (looked in {places}); pass --plugin, "
            "or --no-live-drop to rely on the CRL alone"
        )
        self.searched = tuple(searched)
