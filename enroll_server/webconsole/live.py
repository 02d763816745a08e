"""The console's live stream (Server-Sent Events, HTML Living Standard 9.2): every new audit
entry as it is committed (by this server, the CLI or another node), and the fleet's counts
by state, connected sessions and refused enrollments whenever they change. Pages are
rendered from the registry, so a reload is always right; the stream starts after the newest
entry the page showed (`?since=`, or the browser's Last-Event-ID on a reconnect), so nothing
falls between."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from enroll_server.registry import AuditEntry
from enroll_server.webconsole.activity import refused_total
from enroll_server.webconsole.context import REFUSALS, SESSION_COOKIE, SESSIONS, state

POLL_SECONDS = 0.5
# A comment line now and then keeps proxies from closing a quiet stream (and tells the
# server when the browser has gone).
KEEPALIVE_POLLS = 30
# Counts by state are re-read at each new audit entry (every change of state writes one) and
# this often besides (connections come and go without one).
FLEET_POLLS = 4
# A stream re-checks its session this often: logout, expiry or a rotated token ends it.
SESSION_CHECK_POLLS = 4

_STOPS = web.AppKey("fleetpki_console_streams", set[asyncio.Event])


def attach(app: web.Application) -> None:
    """Streams end when the server shuts down (they would hold its shutdown otherwise)."""
    app[_STOPS] = set()

    async def stop_streams(_app: web.Application) -> None:
        streams: set[asyncio.Event] = app[_STOPS]
        for stop in tuple(streams):
            stop.set()

    app.on_shutdown.append(stop_streams)


def entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "at": entry.at.isoformat(timespec="seconds"),
        "actor": entry.actor,
        "action": entry.action,
        "device_id": entry.device_id.value if entry.device_id else None,
        "detail": json.dumps(entry.detail, sort_keys=True),
    }


def _message(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))  # one line: no newlines
    return ("\n".join(lines) + "\n\n").encode()


def _start_seq(request: web.Request, newest: int) -> int:
    for text in (request.headers.get("Last-Event-ID"), request.query.get("since")):
        if text and text.isdigit():
            return min(int(text), newest)
    return newest


async def events(request: web.Request) -> web.StreamResponse:
    seq = _start_seq(request, state(request).registry.last_audit_seq())
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    stop = asyncio.Event()
    request.app[_STOPS].add(stop)
    try:
        await _stream(request, response, stop, seq)
    finally:
        request.app[_STOPS].discard(stop)
    return response


async def _stream(
    request: web.Request, response: web.StreamResponse, stop: asyncio.Event, seq: int
) -> None:
    st = state(request)
    registry = st.registry
    await response.write(b"retry: 2000\n\n")
    last_fleet: dict[str, Any] | None = None
    polls = 0
    while not stop.is_set():
        polls += 1
        if polls % SESSION_CHECK_POLLS == 0 and (
            request.app[SESSIONS].current(
                request.cookies.get(SESSION_COOKIE), registry.operator_credentials(), st.clock()
            )
            is None
        ):
            break
        out = bytearray()
        for entry in registry.audit_after(seq):
            out += _message("audit", entry_json(entry), entry.seq)
            seq = entry.seq
        if out or polls % FLEET_POLLS == 1:
            fleet = fleet_snapshot(request)
            if fleet != last_fleet:
                out += _message("fleet", fleet)
                last_fleet = fleet
        if not out and polls % KEEPALIVE_POLLS == 0:
            out += b": keep-alive\n\n"
        if out:
            try:
                await response.write(bytes(out))
            except (ConnectionResetError, RuntimeError):
                break  # the browser has gone
        try:
            await asyncio.wait_for(stop.wait(), POLL_SECONDS)
        except TimeoutError:
            pass


def fleet_snapshot(request: web.Request) -> dict[str, Any]:
    """Devices by state and live sessions, as the overview shows them."""
    st = state(request)
    by_state = st.registry.devices_by_state()
    refused = refused_total(dict(st.metrics.enrollments.values))
    request.app[REFUSALS].sample(refused, st.clock())
    live = st.live_sessions
    return {
        "by_state": by_state,
        "total": sum(by_state.values()),
        "connected": None if live is None else len(live()),
        "refused": refused,
    }
