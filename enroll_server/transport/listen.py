"""Opening listeners: the one error every bind failure becomes, naming what, where and the fix."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Iterator

# The ports a listener may be told to use; 0 asks the kernel for any free one (tests, demos).
MAX_PORT = 65535


class ListenFailed(Exception):
    """Listener `what` could not listen on `host`:`port`; `why` says why and what to do."""

    def __init__(self, what: str, host: str, port: int, why: str) -> None:
        super().__init__(f"cannot listen for {what} on {_address(host)}:{port}: {why}")
        self.what = what
        self.host = host
        self.port = port
        self.why = why


def serves_only_this_machine(bind: str, public_host: str) -> str | None:
    """A warning when listeners bound to loopback wait for devices told to come from elsewhere.

    The safe default `bind = "127.0.0.1"` is right for a first try, and wrong as soon as the
    bundles name a host devices reach over a network: they would all time out, with no line
    on the server saying why.
    """
    if not _is_loopback(bind) or _is_loopback(public_host) or public_host == "localhost":
        return None
    return (
        f"listening on {bind} (this machine only), while bundles send devices to "
        f"{public_host!r}: to serve them, run `fleetpki serve --bind 0.0.0.0` (or one address "
        f"of this machine), or set bind under [server] in fleetpki.toml"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _os_error(exc: BaseException) -> BaseException:
    """The OSError (or OverflowError) under `exc`'s chain of causes, else `exc` itself.

    amqtt wraps the bind error twice (BrokerStartError <- BrokerError <- OSError)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; bounded in case of a cycle
        if seen is None:
            break
        if isinstance(seen, OSError | OverflowError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def why_not(exc: BaseException, option: str) -> str:
    """One clause: why a bind failed and what the operator can do about it."""
    cause = _os_error(exc)
    if isinstance(cause, OverflowError):
        return f"the port is outside 0..{MAX_PORT}; choose another with {option}"
    code = getattr(cause, "errno", None)
    if code == errno.EADDRINUSE:
        return (
            "the port is already in use (another fleetpki serve or broker, or mosquitto?); "
            f"stop that process or choose another port with {option}"
        )
    if code == errno.EACCES:
        return (
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); "
            f"choose a port from 1024 up with {option}"
        )
    if isinstance(cause, socket.gaierror) or code in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return (
            "no interface of this machine has that address; fix --bind (or bind in fleetpki.toml)"
        )
    text = getattr(cause, "strerror", None) or str(cause)
    return f"{text}; check --bind and {option}"


@contextlib.contextmanager
def listening(what: str, host: str, port: int, option: str) -> Iterator[None]:
    """Turn a bind failure inside the block into ListenFailed (one line, with the fix)."""
    try:
        yield
    except ListenFailed:
        raise
    except Exception as exc:
        cause = _os_error(exc)
        if not isinstance(cause, OSError | OverflowError):
            raise
        raise ListenFailed(what, host, port, why_not(cause, option)) from exc
