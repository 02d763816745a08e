"""A fleet spread over several processes (shards, simulators/shard.py), seen as one `Fleet`.

The scenario keeps one Journal: every shard's agent events arrive here and are written into
the traces by the same TraceRecorder as in-process agents', at the moment the event
happened in the shard (time.monotonic() is one clock for all processes on Linux), so a
scenario cannot tell the two apart, except in what it measures: each shard's event loop has
its own core's worth of time, and this process keeps the observer and the bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from simulators.fleet import AgentSettings, FleetBase, Seconds, TraceRecorder
from simulators.shard import decode_event, settings_to_json
from simulators.stack import die_with_parent
from simulators.trace import Journal, Outcome

log = logging.getLogger("fleetpki.simulator")

STOP_WAIT = 30.0  # seconds a shard has to report its agents ended, beyond their grace


class ShardFailed(RuntimeError):
    """A shard process ended without being asked to (its stderr log says why)."""

    def __init__(self, index: int, returncode: int | None, log: Path) -> None:
        super().__init__(f"fleet shard {index} exited with status {returncode}; see {log}")
        self.index, self.returncode, self.log = index, returncode, log


class _ShardProcess:
    def __init__(self, index: int, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.index = index
        self.proc = proc
        self.log = log
        self.stopped = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    def send(self, command: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")


class ShardedFleet(FleetBase):
    """The agents of `bundles` in `shards` child processes, behind the interface of FleetBase."""

    def __init__(
        self,
        bundles: dict[str, Path],
        journal: Journal,
        seconds: Seconds,
        settings: AgentSettings,
        rng: random.Random,
        shards: int,
        logs: Path,
    ) -> None:
        if shards < 2:
            raise ValueError(f"a sharded fleet needs at least 2 shards, got {shards}")
        settings_to_json(settings)  # refuse what cannot cross to a shard, now
        super().__init__(bundles, journal, seconds, settings, rng)
        self.logs = logs
        ids = list(bundles)
        self._shard_of = {d: i % shards for i, d in enumerate(ids)}
        self._count = shards
        self._shards: list[_ShardProcess] = []
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._state: dict[str, tuple[str | None, str | None]] = {}
        self._sent: dict[str, int] = {}
        self._recorders: dict[str, TraceRecorder] = {}
        self._event_at = 0.0  # the current event's time, for its recorder
        # seconds() = time.monotonic() - offset: a shard's event times are monotonic
        self._offset = time.monotonic() - seconds()
        self._worst_lag = 0.0
        self._closing = False
        for device_id in ids:
            trace = journal.trace(device_id)
            self._recorders[device_id] = TraceRecorder(
                trace, lambda: self._event_at, on_up=self._settle, listeners=self.listeners
            )

    # -- the processes ---------------------------------------------------------------------
    async def open(self) -> None:
        """Start the shard processes, each with its part of the bundles."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for index in range(self._count):
            log = self.logs / f"shard-{index}.log"
            with log.open("ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "simulators.shard",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    limit=1 << 24,
                    preexec_fn=die_with_parent,
                )
            shard = _ShardProcess(index, proc, log)
            mine = {d: str(p) for d, p in self.bundles.items() if self._shard_of[d] == index}
            setup = {
                "bundles": mine,
                "settings": settings_to_json(self.settings),
                "seed": self.rng.getrandbits(32),
            }
            shard.send(setup)
            shard.reader = asyncio.create_task(self._read(shard), name=f"shard-{index}")
            self._shards.append(shard)

    def processes(self) -> list[int]:
        return [s.proc.pid for s in self._shards if s.proc.returncode is None]

    def take_lag(self) -> float:
        """The worst loop lateness any shard reported since the last call."""
        lag, self._worst_lag = self._worst_lag, 0.0
        return lag

    async def _read(self, shard: _ShardProcess) -> None:
        assert shard.proc.stdout is not None
        stdout = shard.proc.stdout
        while line := await stdout.readline():
            try:
                self._handle(json.loads(line), shard)
            except Exception:  # one bad line must not stop the journal of a whole shard
                log.exception("fleet shard %d: cannot handle %r", shard.index, line[:200])
        shard.stopped.set()
        await shard.proc.wait()
        if not self._closing:
            # Every agent of a dead shard has ended: say so, or the scenario waits for ghosts.
            for device_id in list(self._started - self._ended):
                if self._shard_of[device_id] == shard.index:
                    trace = self.journal.trace(device_id)
                    trace.outcome, trace.reason = Outcome.FAILED, "crash:shard"
                    trace.detail = str(ShardFailed(shard.index, shard.proc.returncode, shard.log))
                    self._end(device_id)

    def _handle(self, item: list[Any], shard: _ShardProcess) -> None:
        kind = item[0]
        if kind == "e":
            device_id, event = decode_event(item)
            if event.state is not None:
                self._state[device_id] = (event.state, self._state.get(device_id, (None, None))[1])
            if event.why is not None:
                self._state[device_id] = (self._state.get(device_id, (None, None))[0], event.why)
            self._event_at = event.at - self._offset
            self._recorders[device_id](event)
        elif kind == "r":
            if self.settings.on_receipt is not None:
                self.settings.on_receipt(item[1], item[2], item[3])
        elif kind == "x":
            _, device_id, outcome, reason, detail, state, last_error, sent = item
            trace = self.journal.trace(device_id)
            trace.outcome, trace.reason, trace.detail = Outcome(outcome), reason, detail
            self._state[device_id] = (state, last_error)
            self._sent[device_id] = self._sent.get(device_id, 0) + sent
            self._end(device_id)
        elif kind == "lag":
            self._worst_lag = max(self._worst_lag, item[1])
        elif kind == "stopped":
            shard.stopped.set()

    def _end(self, device_id: str) -> None:
        self._ended.add(device_id)
        self._record_end(device_id)

    # -- the Fleet interface ---------------------------------------------------------------
    async def start(
        self,
        ids: Iterable[str] | None = None,
        ramp: float | None = None,
        max_inflight: int | None = None,
    ) -> None:
        """Start agents: each shard its own, at its share of `ramp` and `max_inflight`. An
        agent starts once (one that has ended stays ended: a shard has no restart)."""
        todo = [d for d in (self.ids if ids is None else ids) if d not in self._started]
        for device_id in todo:
            trace = self.journal.trace(device_id)
            trace.outcome = Outcome.RUNNING
            if trace.started is None:
                trace.started = self.seconds()
        self._started.update(todo)
        self.pending.update(todo)
        n = self._count
        for shard in self._shards:
            mine = [d for d in todo if self._shard_of[d] == shard.index]
            if mine:
                share_ramp = ramp / n if ramp else None
                share_inflight = max(1, -(-max_inflight // n)) if max_inflight else None
                shard.send(["start", mine, share_ramp, share_inflight])
        await asyncio.gather(*(s.proc.stdin.drain() for s in self._shards if s.proc.stdin))

    async def stop(self, ids: Iterable[str] | None = None, grace: float = 15.0) -> None:
        """Stop every agent (a shard stops as a whole) and end the shard processes."""
        if ids is not None and set(ids) != set(self.ids):
            raise ValueError("a sharded fleet stops all its agents at once")
        self._closing = True
        for shard in self._shards:
            if shard.proc.returncode is None and not shard.stopped.is_set():
                with contextlib.suppress(ConnectionError, RuntimeError):
                    shard.send(["stop", grace])
        for shard in self._shards:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace + STOP_WAIT):
                    await shard.stopped.wait()
            if shard.proc.stdin is not None:
                shard.proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await shard.proc.wait()
            except TimeoutError:
                shard.proc.kill()
                await shard.proc.wait()
            if shard.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await shard.reader
        for device_id in self._started - self._ended:  # lost with a shard that did not answer
            self._end(device_id)

    def running(self, device_id: str) -> bool:
        return device_id in self._started and device_id not in self._ended

    def describe(self, device_id: str) -> tuple[str | None, str | None]:
        return self._state.get(device_id, (None, None))

    def sync_counts(self) -> None:
        """Acknowledged-message counts reach this process when an agent ends (receipts, one
        by one, go to `settings.on_receipt`)."""
        for device_id, trace in self.journal.traces.items():
            trace.sent = self._sent.get(device_id, 0)


__all__ = ["ShardFailed", "ShardedFleet"]
