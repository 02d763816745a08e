"""The lean replacements of amqtt internals behave like what they replace."""

from __future__ import annotations

import asyncio

import pytest
from transitions import MachineError

from enroll_server.broker.hardening import LeanQueue, LeanSession


async def test_lean_queue_is_fifo_and_wakes_a_waiting_getter() -> None:
    q: LeanQueue[int] = LeanQueue()
    assert q.empty() and q.qsize() == 0
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await q.put(1)
    q.put_nowait(2)
    assert await asyncio.wait_for(getter, 1) == 1
    assert q.qsize() == 1
    assert q.get_nowait() == 2
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()


async def test_lean_queue_cancelled_getter_passes_its_item_on() -> None:
    q: LeanQueue[str] = LeanQueue()
    first = asyncio.ensure_future(q.get())
    second = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait("x")  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "x"
    assert first.cancelled()
    assert q.empty()


def test_lean_session_states_follow_amqtt_rules() -> None:
    s = LeanSession()
    assert s.transitions.state == "new"
    s.transitions.connect()
    assert s.transitions.is_connected() and s.last_connect_time is not None
    with pytest.raises(MachineError):
        s.transitions.connect()
    s.transitions.disconnect()
    assert s.transitions.state == "disconnected" and s.last_disconnect_time is not None
    s.transitions.connect()
    assert s.transitions.is_connected()
    assert s.retained_messages.empty() and s.delivered_message_queue.qsize() == 0
