"""The server's event loop choice: uvloop when installed (server extra), else stock asyncio."""

from __future__ import annotations

import asyncio
import importlib


def install_fast_loop() -> bool:
    """Make the next `asyncio.run()` use uvloop; True if it will, False if uvloop is absent.

    Call once at process start, before the loop exists (`fleetpki serve`). uvloop does TLS in
    C (its SSLProtocol is Cython) where asyncio's sslproto runs a Python state machine per
    record, which is most of the Python-level cost of a fresh-connection enrollment. Only the
    server imports this: the device agent never needs uvloop.
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
