"""Cancelling asyncio tasks reliably, even where Python 3.11 loses a cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fleetpki.agent")


async def cancel_all(
    tasks: Iterable[asyncio.Task[Any]], *, grace: float = 0.5, rounds: int = 20
) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again if one survives.

    On Python 3.11 asyncio.wait_for returns the result instead of raising CancelledError when
    the awaited future completes in the same loop iteration as the cancel (CPython gh-86296,
    fixed in 3.12). aiomqtt waits for CONNACK, SUBACK and PUBACK with wait_for, so a stop
    request landing exactly as the broker answers would be lost and the task would run on. A
    second cancel reaches it at its next await. Bounded: gives up after rounds * grace s.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace)
    if pending:
        log.error(
            "tasks did not stop after %.0f s: %s",
            rounds * grace,
            sorted(t.get_name() for t in pending),
        )
