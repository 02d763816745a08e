"""Renewal against the clock: an EST server that stalls for part of the renewal window, then
answers again before notAfter, must still get the device renewed (BENCHMARKS.md, soak: agents
whose short certificate expired while one stalled attempt waited out the 30-s HTTP timeout).

Real agent, real service on 127.0.0.1, a TCP proxy in between that can swallow connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.events import AgentEvent, EventKind
from device_agent.exit_codes import ExitCode
from enroll_server.pki.profile import DeviceProfile
from tests.integration.test_agent_e2e import DEV, FAST_MQTT, until, write_bundle
from tests.live_server import start_live_server

# 9-s certificates backdated a minute: the 2/3 point is already past at issue, so the agent
# renews a third of the validity after issue (schedule.renewal_after_issue) with ~6 s left.
PROFILE = DeviceProfile(validity=timedelta(seconds=9), backdate=timedelta(seconds=60))
# A fleet's slow backoff (3-6 s): longer than what remains after a stalled attempt.
SLOW_EST = Backoff(base=6.0, factor=1.0, cap=6.0)


class StallingProxy:
    """Forwards TCP to `port`, or, while `stalling`, accepts connections and never answers
    (a lost route, a server wedged mid-handshake): the client sees nothing until it gives up.
    A connection swallowed stays swallowed after `stalling` is turned off."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stalling = False
        self.swallowed = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    @property
    def listen_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.stalling:
            self.swallowed += 1
            return  # held open, never read, never answered
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[tuple[StallingProxy, Path]]:
    server = start_live_server(tmp_path / "home", profile=PROFILE, clock=clock)
    try:
        async with StallingProxy(server.handle.est_port) as proxy:
            config = write_bundle(
                tmp_path / DEV,
                device=DEV,
                est_port=proxy.listen_port,
                mqtt_port=1,  # no broker: the session keeps failing, which must not matter
                root_cert=server.layout.root_cert,
                token=server.mint_device(DEV),
            )
            yield proxy, config
    finally:
        server.stop()


async def test_renewal_survives_a_stall_that_ends_before_not_after(tmp_path: Path) -> None:
    """The first renewal attempt is swallowed; the server answers again well before notAfter.
    Each attempt is bounded so that it leaves time for another (here half of the ~6 s left,
    not the 30-s HTTP timeout), and the pause after it by half of what remains *after* it, so
    a second attempt happens in time and renews. Before: the one attempt waited 30 s, past
    notAfter, and the agent stopped asking for a new token (exit REBOOTSTRAP)."""
    events: list[tuple[datetime, AgentEvent]] = []
    async with stack(tmp_path) as (proxy, config):
        agent = Agent(
            load_config(config),
            est_backoff=SLOW_EST,
            mqtt_backoff=FAST_MQTT,
            on_event=lambda e: events.append((datetime.now(UTC), e)),
        )
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.identity is not None, 10, "enrolled")
            first = agent.identity
            assert first is not None
            proxy.stalling = True
            await until(lambda: proxy.swallowed >= 1, 10, "first renewal attempt")
            stalled_at = time.monotonic()
            await asyncio.sleep(0.5)
            proxy.stalling = False  # the server is back, ~5 s before notAfter
            left = (first.not_after - datetime.now(UTC)).total_seconds()
            assert left > 3, f"the stall must end well before notAfter ({left:.1f} s left)"
            await until(lambda: agent.renewals >= 1 or task.done(), left + 5, "renewal or exit")
            retries = [(t, e) for t, e in events if e.kind is EventKind.RETRY and e.what == "renew"]
            assert not task.done(), f"agent ended: {task.result()}, {agent.last_error}"
            assert agent.renewals == 1 and agent.state is not AgentState.EXPIRED
            assert agent.identity is not None and agent.identity.not_after > first.not_after
            # The swallowed attempt gave up in time for another, and its retry
            # was timed to happen before notAfter.
            assert retries, "the swallowed attempt must have been retried"
            at, retry = retries[0]
            assert retry.delay is not None and retry.at - stalled_at < 4.0
            assert at + timedelta(seconds=retry.delay) < first.not_after
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)


async def test_expiry_during_the_attempt_is_an_expiry_not_a_refusal(tmp_path: Path) -> None:
    """The attempt starts in time, but the certificate expires while it is under way (a
    starved device, a slow link: here both clocks jump past notAfter as it starts), so the
    server refuses it (403, expired). That is the expiry path (re-bootstrap with the birth
    certificate or a token; without either exit 5, "needs a new token"), not a refusal (exit
    3, which an IDevID device would never recover from by itself)."""
    skew = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + skew[0]

    def on_event(event: AgentEvent) -> None:
        if event.kind is EventKind.STATE and event.state == AgentState.RENEWING:
            skew[0] = PROFILE.validity  # the attempt takes longer than what was left

    async with stack(tmp_path, clock=clock) as (_, config):
        agent = Agent(
            load_config(config),
            est_backoff=SLOW_EST,
            mqtt_backoff=FAST_MQTT,
            clock=clock,
            on_event=on_event,
        )
        code = await asyncio.wait_for(agent.run(), 20)
    assert skew[0], "the renewal must have started"
    assert (code, agent.state) == (ExitCode.REBOOTSTRAP, AgentState.EXPIRED), agent.last_error
    assert "expired" in (agent.last_error or "") and "no enrollment token" in agent.last_error
