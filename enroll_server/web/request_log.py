"""The aiohttp server's log: a malformed request is one rate-limited line, never its bytes.

aiohttp logs a request its parser refuses (400) with a traceback whose message quotes the raw
request around the fault, so a device's HTTP Basic credentials or the admin bearer token
sent in the same head would reach the log. Every such request from the network would also
write a traceback. `RequestLog` is the `logger` aiohttp's request handler gets instead: a
refused request becomes one line naming the peer and the kind of fault (the exception's
class, never its message), at most `MALFORMED_PER_WINDOW` lines per `WINDOW_SECONDS`, then one
line counting those not logged. A handler's own exception (a bug, 500) keeps its traceback:
it carries no request bytes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

MALFORMED_PER_WINDOW = 10
WINDOW_SECONDS = 60.0


class RequestLog:
    """Duck-typed `logging.Logger` for aiohttp's RequestHandler(logger=...)."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        per_window: int = MALFORMED_PER_WINDOW,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.per_window = per_window
        self.window = window
        self.clock = clock
        self._window_start = -window
        self._logged = 0
        self._suppressed = 0

    # --- what aiohttp's RequestHandler calls ----------------------------------------------
    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        self._log(logging.ERROR, msg, args, exc_info)

    def error(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        self._log(logging.ERROR, msg, args, exc_info)

    def warning(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        self._log(logging.WARNING, msg, args, exc_info)

    def info(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        self._log(logging.INFO, msg, args, exc_info)

    def debug(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        self._log(logging.DEBUG, msg, args, exc_info)

    def isEnabledFor(self, level: int) -> bool:
        return self.log.isEnabledFor(level)

    # --- the rules ------------------------------------------------------------------------
    def _log(self, level: int, msg: str, args: tuple[Any, ...], exc_info: Any) -> None:
        exc = _exception_of(exc_info)
        if isinstance(exc, HttpProcessingError):
            self._malformed(level, args, exc)
        elif exc is not None and not isinstance(exc, Exception):
            self.log.log(level, msg, *args)  # CancelledError and the like: no traceback
        else:
            # A handler's exception (a server bug) keeps its traceback: no request bytes in it.
            self.log.log(level, msg, *args, exc_info=exc)

    def _malformed(self, level: int, args: tuple[Any, ...], exc: HttpProcessingError) -> None:
        # Never str(exc): aiohttp's message quotes the raw request (credentials included).
        level = min(level, logging.INFO)
        if not self.log.isEnabledFor(level):
            return
        now = self.clock()
        if now - self._window_start >= self.window:
            if self._suppressed:
                self.log.info(
                    "%d more malformed requests not logged in %.0f s",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.per_window:
            self._suppressed += 1
            return
        self._logged += 1
        peer = args[0] if args else "?"
        status = exc.code if isinstance(exc.code, int) and exc.code >= 400 else 400
        kind = type(exc).__name__
        self.log.log(level, "malformed request from %s -> %d (%s)", peer, status, kind)


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None
