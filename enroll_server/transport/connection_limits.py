"""Connection limits of the HTTP listeners: deadlines per connection, a cap per source address.

Every connection of the EST (HTTPS), CRL/OCSP (HTTP) and admin listeners is held to:
- `head_timeout`: the TLS handshake completes, and a request head is complete, within this
  many seconds (the head counted from its first byte, so a head sent a byte at a time gains
  nothing);
- `idle_timeout`: a connection with no request in progress (after it opened, after a reply)
  sends the first byte of its next request within this many seconds; a request body keeps
  arriving (no gap longer than this); a reply the client does not read for this long ends it;
- after the client ends its input (TCP FIN, TLS close_notify), a request already received is
  still answered, then the connection is closed (a half-close, RFC 9112 9.6); one with no
  request left to answer is closed;
- `max_per_source`: at most this many open connections from one source address (IPv4 address,
  IPv6 /64: throttle.source_key) per listener; more are closed at once. Loopback sources
  (this machine: the simulator, a local reverse proxy) are not capped unless `cap_loopback`.

Without these an idle keep-alive stayed open for aiohttp's default hour, a silent TCP
connection to the CRL/OCSP port for ever, and a hundred of them from one address used up the
process's file descriptors, the broker's too. The lean EST front end (est/front.py) keeps its
connections' `Watch` itself; the aiohttp request handlers run behind `Watched`, with
`deadline_middleware` telling when a request is being served. One timer per listener sweeps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from enroll_server.enrollment.throttle import source_key
from enroll_server.home.config import ServerConfig

log = logging.getLogger("fleetpki.connections")

_REPORT_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits (seconds, a count); fleetpki.toml's [connections] section."""

    head_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_per_source: int = 64
    cap_loopback: bool = False

    def __post_init__(self) -> None:
        if self.head_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("head_timeout and idle_timeout must be positive")
        if self.max_per_source < 1:
            raise ValueError(f"max_per_source must be at least 1, got {self.max_per_source}")

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> ConnectionLimits:
        return cls(
            head_timeout=cfg.head_timeout.total_seconds(),
            idle_timeout=cfg.idle_timeout.total_seconds(),
            max_per_source=cfg.max_per_source,
            cap_loopback=cfg.cap_loopback,
        )

    @property
    def sweep_interval(self) -> float:
        """How often deadlines are checked: a fifth of the shorter one, 20 ms to 1 s."""
        return min(1.0, max(0.02, min(self.head_timeout, self.idle_timeout) / 5))


class Body(Protocol):
    def is_eof(self) -> bool: ...


class _Reading:
    """The lean front end's body in progress (aiohttp's is the request's StreamReader)."""

    def is_eof(self) -> bool:
        return False


READING = _Reading()


class Watch:
    """Where one connection stands against its deadlines; its protocol keeps it current.

    At most one of `idle_since` (no request in progress since), `head_since` (a head being
    read since its first byte) and `body` (a body being read) is set; none while the server
    works on a reply.
    """

    __slots__ = (
        "body",
        "eof",
        "eof_idle",
        "head_since",
        "idle_since",
        "rx_at",
        "source",
        "stall_since",
        "stall_size",
        "transport",
    )

    def __init__(self, transport: asyncio.BaseTransport, source: str, now: float) -> None:
        self.transport = transport
        self.source = source  # "" when not counted against the per-source cap
        self.idle_since: float | None = now
        self.head_since: float | None = None
        self.body: Body | None = None
        self.rx_at = now
        self.eof = False
        self.eof_idle = False
        self.stall_size = 0
        self.stall_since: float | None = None

    def received(self, now: float) -> None:
        """Bytes arrived: the first of a request starts its head's deadline."""
        self.rx_at = now
        if self.idle_since is not None:
            self.idle_since = None
            self.head_since = now

    def serving(self) -> None:
        """A whole request is in; the server works on the reply (no deadline of the client's)."""
        self.idle_since = self.head_since = self.body = None

    def overdue(self, now: float, limits: ConnectionLimits) -> str | None:
        """Which deadline this connection has missed, if any."""
        if self.body is not None and self.body.is_eof():
            self.body = None
        if self.eof:
            # Ended input and nothing left to answer. Confirmed at a second sweep: aiohttp may
            # hold a whole request whose handler has not started yet (a loop iteration or two).
            waiting = (
                self.idle_since is not None or self.head_since is not None or self.body is not None
            )
            if waiting and self.eof_idle:
                return "input ended"
            self.eof_idle = waiting
        size = self.transport.get_write_buffer_size()  # type: ignore[attr-defined]
        if size:
            # A reply on its way: it must keep moving, whatever else the connection does.
            if self.stall_since is None or size != self.stall_size:
                self.stall_size, self.stall_since = size, now
            elif now - self.stall_since > limits.idle_timeout:
                return "reply not read"
            return None
        self.stall_since = None
        if self.idle_since is not None and now - self.idle_since > limits.idle_timeout:
            return "idle"
        if self.head_since is not None and now - self.head_since > limits.head_timeout:
            return "request head not complete in time"
        if self.body is not None and now - self.rx_at > limits.idle_timeout:
            return "request body stalled"
        return None


class Guard:
    """One listener's connections: admitted per source, their deadlines swept on a timer."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open_by_source: dict[str, int] = {}
        self.watches: dict[asyncio.BaseTransport, Watch] = {}
        # Run at every sweep too (the TLS listener's handshake deadline).
        self.also_sweep: list[Callable[[], None]] = []
        self.refused = 0
        self._reported = 0
        self._reported_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- per-source cap ------------------------------------------------------------------
    def admit(self, peername: Any) -> str | None:
        """The source a new connection counts against ("": not counted), or None: over the cap."""
        host = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if not self.limits.cap_loopback and _is_loopback(host):
            return ""
        key = source_key(host)
        count = self.open_by_source.get(key, 0)
        if count >= self.limits.max_per_source:
            self.refused += 1
            log.debug("refused a connection from %s: %d open from %s", host, count, key)
            return None
        self.open_by_source[key] = count + 1
        return key

    def release(self, source: str) -> None:
        if not source:
            return
        count = self.open_by_source.get(source, 0) - 1
        if count > 0:
            self.open_by_source[source] = count
        else:
            self.open_by_source.pop(source, None)

    # --- deadlines -----------------------------------------------------------------------
    def watch(self, transport: asyncio.BaseTransport, source: str = "") -> Watch:
        watch = Watch(transport, source, time.monotonic())
        self.watches[transport] = watch
        return watch

    def forget(self, watch: Watch) -> None:
        if self.watches.get(watch.transport) is watch:
            del self.watches[watch.transport]
            self.release(watch.source)

    def start(self) -> None:
        if self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.limits.sweep_interval, self._tick)

    def _tick(self) -> None:
        self.sweep(time.monotonic())
        self._schedule()

    def sweep(self, now: float) -> None:
        """Close every connection past a deadline (an ended input gracefully, with its reply)."""
        for watch in list(self.watches.values()):
            why = watch.overdue(now, self.limits)
            if why is None:
                continue
            log.debug("closing a connection: %s", why)
            self.forget(watch)
            if watch.eof and why == "input ended":
                watch.transport.close()
            else:
                watch.transport.abort()  # type: ignore[attr-defined]
        for extra in self.also_sweep:
            extra()
        if self.refused > self._reported and now - self._reported_at >= _REPORT_EVERY:
            log.warning(
                "refused %d connection(s) over the cap of %d per source address",
                self.refused - self._reported,
                self.limits.max_per_source,
            )
            self._reported, self._reported_at = self.refused, now


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Watched(asyncio.Protocol):
    """An aiohttp request handler's connection, counted per source and held to the deadlines.

    `watch`: the connection's Watch when the EST front end hands it over (admitted already);
    None for a fresh connection of a plain aiohttp listener. `half_close`: whether the
    transport keeps its write side after the peer's end of input (asyncio's own TLS transport
    does not: the admin listener's connections then close as asyncio closes them).
    """

    def __init__(
        self,
        guard: Guard,
        inner: asyncio.Protocol,
        watch: Watch | None = None,
        *,
        half_close: bool = True,
    ) -> None:
        self.guard = guard
        self.inner = inner
        self.watch = watch
        self.half_close = half_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.watch is None:
            source = self.guard.admit(transport.get_extra_info("peername"))
            if source is None:
                transport.abort()  # type: ignore[attr-defined]
                return
            self.watch = self.guard.watch(transport, source)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.watch is not None:
            self.watch.received(time.monotonic())
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """A half-close: a request already in is answered (deadline_middleware closes after
        its reply); with none left to answer, the next sweeps close the connection."""
        if self.watch is None:
            return False
        self.inner.eof_received()
        self.watch.eof = True
        return self.half_close or None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.watch is not None:
            self.guard.forget(self.watch)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


CONNECTION_GUARD = web.AppKey("connection_guard", Guard)

_Handler = Callable[[web.Request], Any]


@web.middleware
async def deadline_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Tell the connection's Watch that a request is being served, and when it is done."""
    guard = request.app.get(CONNECTION_GUARD)
    watch = guard.watches.get(request.transport) if guard and request.transport else None
    if watch is None:
        response: web.StreamResponse = await handler(request)
        return response
    watch.serving()
    if not request.content.is_eof():
        watch.body = request.content
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if watch.eof:
            exc.force_close()
        raise
    finally:
        watch.body = None
        watch.idle_since = time.monotonic()
    if watch.eof:
        response.force_close()  # the client ended its input: this reply is the last
    return response
