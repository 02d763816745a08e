"""MqttLink._serve when the connection is lost: the pump and the listener fail in the same
turn, and both failures are read (none left for asyncio's "never retrieved" log)."""

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


def test_both_failures_are_read_and_the_first_is_raised(tmp_path: Path) -> None:
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
        client = _LostClient(lost)
        loop.call_later(0.05, lost.set)
        with pytest.raises(aiomqtt.MqttError):
            await link._serve(client)  # type: ignore[arg-type]
        gc.collect()  # a task whose exception nobody read reports it when collected
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    assert [c.get("message") for c in unretrieved] == []
