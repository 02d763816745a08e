"""The server's event loop choice: uvloop when installed (server extra), else stock asyncio."""

from __future__ import annotations

import asyncio
import importlib
import os


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
