"""Whether the server name a batch's bundles carry resolves from this machine (a warning only)."""

from __future__ import annotations

import ipaddress
import socket
import threading

# getaddrinfo has no timeout of its own; a resolver that hangs must not hang `batch create`.
RESOLVE_TIMEOUT = 2.0


def unresolvable(host: str, timeout: float = RESOLVE_TIMEOUT) -> str | None:
    """None if `host` is an IP address or resolves here; else why not, in a few words.

    Asks only the local resolver (getaddrinfo): nothing else is contacted. The bundles may be
    right anyway (the devices' network may know names this machine does not), so callers warn,
    never refuse.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    outcome: list[str | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            outcome.append(None)
        except (OSError, UnicodeError) as exc:
            outcome.append(str(getattr(exc, "strerror", None) or exc))

    worker = threading.Thread(target=resolve, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"no answer from the resolver within {timeout:g} s"
    return outcome[0]
