"""MqttLink._serve when the connection is lost: the pump and the listener fail in the same
turn, or the second while it is cancelled, and every failure is read (none left for asyncio's
"never retrieved" log)."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from device_agent.mqtt_link import MqttLink
from fleetpki.identity import DeviceId


class _LostClient:
    """Both ends see the same lost connection: publish and the message iterator fail at once."""

    def __init__(self, lost: asyncio.Event) -> None:
        self.lost = lost

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        await self.lost.wait()
        raise aiomqtt.MqttCodeError(4, "Could not publish message")

    @property
    def messages(self) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            await self.lost.wait()
            raise aiomqtt.MqttError("Disconnected during message iteration")
            yield  # an async generator

        return gen()


class _CancelTurnedIntoError(_LostClient):
    """The publish fails first; the listener, cancelled, ends with an error instead (what
    aiomqtt's iterator did in the 2,000-agent soak: "Disconnected during message iteration"
    on a task asyncio.wait had not returned as done)."""

    @property
    def messages(self) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise aiomqtt.MqttError("Disconnected during message iteration") from None
            yield  # an async generator

        return gen()


@pytest.mark.parametrize("client_type", [_LostClient, _CancelTurnedIntoError])
def test_every_failure_is_read_and_the_first_is_raised(
    tmp_path: Path, client_type: type[_LostClient]
) -> None:
    unretrieved: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
        link = MqttLink(
            DeviceId("dev-1"),
            "127.0.0.1",
            1,
            tmp_path / "ca.pem",
            lambda: (tmp_path / "c.pem", tmp_path / "k.pem"),
            rng=random.Random(1),
        )
        link.enqueue(b"{}")
        lost = asyncio.Event()
        client = client_type(lost)
        loop.call_later(0.05, lost.set)
        with pytest.raises(aiomqtt.MqttError):
            await link._serve(client)  # type: ignore[arg-type]
        gc.collect()  # a task whose exception nobody read reports it when collected
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    assert [c.get("message") for c in unretrieved] == []


def test_a_stop_that_cancels_twice_leaves_no_failure_unread(tmp_path: Path) -> None:
    """The agent stops: `_serve` is cancelled, and cancelled again while it cancels its own
    tasks (cancel_all's second round); the listener ends with aiomqtt's error meanwhile."""
    unretrieved: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
        link = MqttLink(
            DeviceId("dev-1"),
            "127.0.0.1",
            1,
            tmp_path / "ca.pem",
            lambda: (tmp_path / "c.pem", tmp_path / "k.pem"),
            rng=random.Random(1),
        )
        link.enqueue(b"{}")
        client = _CancelTurnedIntoError(asyncio.Event())  # the publish never completes
        serve = asyncio.create_task(link._serve(client))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        serve.cancel()
        await asyncio.sleep(0)
        serve.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serve
        for _ in range(3):
            await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    assert [c.get("message") for c in unretrieved] == []
