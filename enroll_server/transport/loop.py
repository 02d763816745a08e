"""The server's event loop: uvloop when installed (server extra), else stock asyncio; and
waiting on it for the signal that ends a long-running command."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal


def install_fast_loop() -> bool:
    """Make the next `asyncio.run()` use uvloop; True if it will, False if uvloop is absent.

    Call once at process start, before the loop exists (`fleetpki serve`). The EST listener
    runs its own TLS on ssl.SSLSocket (tls_socket.py); the embedded broker's TLS goes through
    the loop's transports, which uvloop implements in C (asyncio's sslproto runs a Python
    state machine per record). On the EST path uvloop gave ~5-10 % more enrollments/s at
    the same CPU per enrollment (BENCHMARKS.md). Only the server imports this: the device
    agent never needs uvloop. FLEETPKI_NO_UVLOOP=1 keeps the stock loop (to compare, or to
    rule uvloop out while debugging).
    """
    if os.environ.get("FLEETPKI_NO_UVLOOP"):
        return False
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def until_stop_signal() -> None:
    """Return at SIGINT (Ctrl-C) or SIGTERM, taken as the normal end of a command that runs
    until stopped (`fleetpki serve`, `demo --keep-running`): what follows is its usual
    cleanup, not an interruption. The loop's previous handling of both is restored."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
