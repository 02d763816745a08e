"""The packet reader of an admitted connection: refuses an oversized packet before its body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amqtt.adapters import ReaderAdapter
from amqtt.errors import NoDataError

from enroll_server.broker.connect_frame import read_remaining_length


class BoundedPacketReader(ReaderAdapter):
    """amqtt's ReaderAdapter over the connection's StreamReader, one packet at a time.

    amqtt reads a fixed header and then `readexactly(remaining length)` of body, buffering a
    whole PUBLISH of up to 256 MiB before anything looks at it. Here, at each packet boundary,
    the fixed header is read ahead (MQTT 3.1.1 section 2.2: one byte, then the remaining
    length); a packet whose size (header included, as mosquitto's `max_packet_size` counts
    it) exceeds `max_size` makes `on_violation` end the connection before a byte of its body
    is read. A field that would run past its packet's remaining length is a malformed packet
    and ends it too (amqtt would read into the next packet).

    After a violation every read reports end of data (NoDataError), so amqtt's reader loop
    stops as it does for a peer that went away.
    """

    __slots__ = ("_ahead", "_left", "_max_size", "_on_violation", "_reader", "_stopped")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_size: int,
        on_violation: Callable[[str, bool], None],
    ) -> None:
        self._reader = reader
        self._max_size = max_size
        self._on_violation = on_violation  # (why, too_large)
        self._ahead = b""  # fixed-header bytes read ahead, not yet handed to amqtt
        self._left = 0  # body bytes of the current packet amqtt has yet to read
        self._stopped = False

    def _stop(self, why: str, *, too_large: bool) -> NoDataError:
        self._stopped = True
        self._on_violation(why, too_large)
        return NoDataError(why)

    async def _next_header(self) -> None:
        try:
            first = await self._reader.readexactly(1)
            encoded, length = await read_remaining_length(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise NoDataError("connection closed") from exc
        if length is None:
            raise self._stop("remaining length is longer than four bytes", too_large=False)
        size = 1 + len(encoded) + length
        if size > self._max_size:
            kind = first[0] >> 4
            raise self._stop(
                f"packet of type {kind} is {size} bytes, over the {self._max_size}-byte "
                "maximum packet size",
                too_large=True,
            )
        self._ahead = first + encoded
        self._left = length

    async def read(self, n: int = -1) -> bytes:
        if self._stopped:
            raise NoDataError("connection ended")
        if n < 0:
            # amqtt reads packets by length only; reading to EOF would be unbounded.
            raise self._stop("read to end of stream requested", too_large=False)
        if not self._ahead and self._left == 0:
            await self._next_header()
        head = self._ahead[:n]
        self._ahead = self._ahead[len(head) :]
        want = n - len(head)
        if want == 0:
            return head
        if want > self._left:
            raise self._stop(
                f"a field of {want} bytes runs past the {self._left} left in its packet",
                too_large=False,
            )
        try:
            body = await self._reader.readexactly(want)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise NoDataError("connection closed") from exc
        self._left -= want
        return head + body if head else body

    def feed_eof(self) -> None:
        self._reader.feed_eof()
