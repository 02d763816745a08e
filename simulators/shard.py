"""A shard: part of a simulated fleet in a process of its own (`python -m simulators.shard`).

One Python process runs one event loop on one core. 2,000 agents in it made the loop late by
a median of 0.8 s and by up to 6.7 s after each broker restart (the 2026-12-05 soak): late
enough for a renewal to miss a two-minute certificate's window. A ShardedFleet
(simulators/sharded_fleet.py) spreads the agents over several of these processes; each runs
an ordinary `Fleet` and reports back on its stdout.

The protocol: JSON, one message per line. The first line on stdin is the set-up
({"bundles": {id: agent.toml}, "settings": {...}, "seed": n}); then commands
(["start", ids, ramp, max_inflight], ["stop", grace]). On stdout (times are
time.monotonic(), which on Linux is one clock for every process):
  ["e", device, kind, at, serial, old_serial, reason, state, what, why, delay]  an AgentEvent
  ["r", device, message key, at]                                               a receipt
  ["x", device, outcome, reason, detail, state, last_error, published]          an agent ended
  ["lag", seconds]          the loop's worst lateness since the last report (every second)
  ["stopped"]               after "stop": every agent has ended
The shard stops its agents and exits when stdin closes (its parent is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from device_agent.backoff import Backoff
from device_agent.events import AgentEvent, EventKind
from simulators.fleet import AgentSettings, Fleet, published
from simulators.stack import Endpoints
from simulators.trace import Journal

log = logging.getLogger("fleetpki.simulator")

FLUSH_EVERY = 0.05  # seconds between writes of the output buffer
LAG_EVERY = 1.0
HEARTBEAT = 0.1


def settings_to_json(settings: AgentSettings) -> dict[str, Any]:
    """What of AgentSettings crosses to a shard (callables do not: receipts are forwarded)."""
    if settings.clock_for is not None:
        raise ValueError("a sharded fleet cannot take per-device clocks (clock_for)")

    def backoff(b: Backoff | None) -> list[float] | None:
        return None if b is None else [b.base, b.factor, b.cap]

    ep = settings.endpoints
    return {
        "telemetry_interval": settings.telemetry_interval,
        "mqtt_backoff": backoff(settings.mqtt_backoff),
        "est_backoff": backoff(settings.est_backoff),
        "clock_poll": settings.clock_poll,
        "endpoints": None if ep is None else [ep.host, ep.est_port, ep.http_port, ep.mqtt_port],
        "receipts": settings.on_receipt is not None,
    }


def settings_from_json(data: dict[str, Any]) -> AgentSettings:
    def backoff(raw: list[float] | None) -> Backoff | None:
        return None if raw is None else Backoff(base=raw[0], factor=raw[1], cap=raw[2])

    ep = data["endpoints"]
    return AgentSettings(
        telemetry_interval=data["telemetry_interval"],
        mqtt_backoff=backoff(data["mqtt_backoff"]),
        est_backoff=backoff(data["est_backoff"]),
        clock_poll=data["clock_poll"],
        endpoints=None if ep is None else Endpoints(ep[0], ep[1], ep[2], ep[3]),
    )


def encode_event(device_id: str, e: AgentEvent) -> list[Any]:
    line = ["e", device_id, e.kind.value, e.at, e.serial, e.old_serial, e.reason, e.state]
    if e.kind is EventKind.RETRY:  # the only kind with these: keep the common lines short
        line += [e.what, e.why, e.delay]
    return line


def decode_event(line: list[Any]) -> tuple[str, AgentEvent]:
    """The inverse of encode_event: (device id, the event)."""
    what, why, delay = line[8:11] if len(line) > 8 else (None, None, None)
    event = AgentEvent(
        EventKind(line[2]),
        serial=line[4],
        old_serial=line[5],
        reason=line[6],
        state=line[7],
        what=what,
        why=why,
        delay=delay,
        at=line[3],
    )
    return line[1], event


class Shard:
    """The shard's side: a Fleet, its events and receipts written out in batches."""

    def __init__(self, setup: dict[str, Any]) -> None:
        bundles = {d: Path(p) for d, p in setup["bundles"].items()}
        settings = settings_from_json(setup["settings"])
        if setup["settings"]["receipts"]:
            settings.on_receipt = self._receipt
        t0 = time.monotonic()
        self.fleet = Fleet(
            bundles,
            Journal(),
            lambda: time.monotonic() - t0,
            settings,
            random.Random(setup["seed"]),
        )
        self.fleet.listeners.append(self._event)
        self.fleet.ended_listeners.append(self._ended)
        self._out: list[bytes] = []
        self._worst_lag = 0.0

    def _write(self, item: list[Any]) -> None:
        self._out.append(json.dumps(item, separators=(",", ":")).encode() + b"\n")

    def _event(self, device_id: str, event: AgentEvent) -> None:
        self._write(encode_event(device_id, event))

    def _receipt(self, device_id: str, key: int, at: float) -> None:
        self._write(["r", device_id, key, at])

    def _ended(self, device_id: str) -> None:
        trace = self.fleet.journal.trace(device_id)
        agent = self.fleet.agents.get(device_id)
        state, last_error = self.fleet.describe(device_id)
        sent = published(agent) if agent is not None else 0
        outcome = [trace.outcome.value, trace.reason, trace.detail]
        self._write(["x", device_id, *outcome, state, last_error, sent])

    async def _flusher(self) -> None:
        out = sys.stdout.buffer
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush(out)

    def flush(self, out: Any) -> None:
        if self._out:
            chunk, self._out = b"".join(self._out), []
            out.write(chunk)
            out.flush()

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        last_report = loop.time()
        while True:
            due = loop.time() + HEARTBEAT
            await asyncio.sleep(HEARTBEAT)
            self._worst_lag = max(self._worst_lag, loop.time() - due)
            if loop.time() - last_report >= LAG_EVERY:
                self._write(["lag", round(self._worst_lag, 3)])
                self._worst_lag, last_report = 0.0, loop.time()

    async def run(self, reader: asyncio.StreamReader) -> None:
        helpers = [asyncio.create_task(self._flusher()), asyncio.create_task(self._heartbeat())]
        starting: asyncio.Task[None] | None = None
        try:
            while line := await reader.readline():
                command = json.loads(line)
                if command[0] == "start":
                    _, ids, ramp, max_inflight = command
                    starting = asyncio.create_task(self.fleet.start(ids, ramp, max_inflight))
                elif command[0] == "stop":
                    if starting is not None:
                        starting.cancel()
                    await self.fleet.stop(grace=command[1])
                    self._write(["stopped"])
                    break
        finally:
            if starting is not None and not starting.done():
                starting.cancel()
            with contextlib.suppress(Exception):
                await self.fleet.stop(grace=5.0)  # stdin closed: the parent is gone
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.flush(sys.stdout.buffer)


async def serve_stdin() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)  # the set-up line lists every bundle
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    setup = await reader.readline()
    if setup:
        await Shard(json.loads(setup)).run(reader)


def main() -> None:
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a shard stops
    asyncio.run(serve_stdin())


if __name__ == "__main__":
    main()
