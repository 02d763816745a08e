"""The EST front end's request framing, differentially against aiohttp's parser.

The lean front end (enroll_server/est/front.py) serves plain enrollment POSTs itself and hands
every other request, with the bytes read so far, to the aiohttp server behind it. It is a
faithful fast path only if, for every byte stream a client can send, it agrees with the
parser aiohttp would have used on the same connection: each request it serves, aiohttp would
have parsed into the same request (method, target, version, Content-Length, the fields the
front end reads, keep-alive), and both would put the end of that request (and the start of
the next) at the same byte. `check(pieces)` feeds a stream, cut into `pieces` as TCP might,
to both and raises Disagreement naming the first difference.

The front end is the real EstConnection (its data_received and framing code) with only its
three exits recorded instead of acted on: serving a request, handing over, replying with an
error. aiohttp is the parser of the request handler `fleetpki serve` hands over to, built by
the same runner (http_app._runner), so with the same limits.

Verdicts that are no disagreement (documented in README "EST front end"):
- the front end hands over: aiohttp judges that request, so there is nothing to compare
  from there on;
- a head over MAX_HEAD bytes is 431 at the front end, a body over MAX_BODY 413 (before it is
  read); aiohttp's parser has per-line limits only, and its request handler answers such a
  body 413 when it is read. For 413 both must still agree on the Content-Length;
- the stream ends inside a request: neither has a verdict yet.
"""

from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from enroll_server.est import front
from enroll_server.est.front import Head
from enroll_server.transport.connection_limits import ConnectionLimits
from enroll_server.web.app import MAX_BODY, _runner

# Pieces of requests for generated streams (the Hypothesis property, the atheris harness): the
# request lines and fields the front end reads, and the odd bytes HTTP parsers disagree on.
EST = b"/.well-known/est/"
METHODS = [b"POST", b"POST", b"POST", b"GET", b"post", b"PUT", b"POST "]
TARGETS = [
    EST + b"simpleenroll",
    EST + b"simplereenroll",
    EST + b"simpleenroll?a=1",
    EST + b"cacerts",
    EST + b"simpleenroll/",
    b"http://localhost" + EST + b"simpleenroll",
    EST + b"simpleenroll#x",
    EST + b"simpleenroll?%zz",
    EST + b"simpleenroll?a\x01b",
    EST + b"simpleenroll?{x}",
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"]
NAMES = [
    b"Host",
    b"Content-Length",
    b"Content-Type",
    b"Authorization",
    b"Connection",
    b"Transfer-Encoding",
    b"Expect",
    b"Upgrade",
    b"Keep-Alive",
    b"X-Pad",
    b"content-length",
    b"Content-Length ",
    b" Host",
]
VALUES = [
    b"localhost",
    b"application/pkcs10",
    b"Basic ZGV2OnRvaw==",
    b"close",
    b"keep-alive",
    b"Keep-Alive, close",
    b"close, upgrade",
    b"chunked",
    b"100-continue",
    b"websocket",
    b"0",
    b"5",
    b"05",
    b"+5",
    b"5, 5",
    b"-1",
    b"99999999999999",
    b"\xe9t\xe9",
    b"a\x01b",
    b"a\tb",
    b"\x7f",
    b"noclose",
    b"close foo",
]
ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n "]


class Disagreement(AssertionError):
    """The front end and aiohttp read the same bytes differently."""


@dataclass
class FrontResult:
    served: list[tuple[Head, bytes]] = field(default_factory=list)
    handed_over: bool = False
    refused: int | None = None  # 431 or 413
    refused_head: Head | None = None


@dataclass
class AiohttpResult:
    # (message, body so far, complete)
    messages: list[tuple[Any, bytes, bool]] = field(default_factory=list)
    error: str | None = None


class _Transport:
    """What EstConnection asks of its transport while it frames requests."""

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class _RecordingConnection(front.EstConnection):
    """The front end's connection, its three exits recorded."""

    def __init__(self, result: FrontResult) -> None:
        stub = types.SimpleNamespace(
            max_body=MAX_BODY, max_buffer=front.MAX_HEAD + 4 + MAX_BODY, connections=set()
        )
        super().__init__(stub)  # type: ignore[arg-type]
        self.result = result
        self.transport = _Transport()  # type: ignore[assignment]

    def _serve(self, head: Head, body: bytes) -> None:
        self.result.served.append((head, body))
        if not head.keep_alive:
            self.transport = None  # the reply says Connection: close and closes (_write)

    def _hand_over(self) -> None:
        self.result.handed_over = True
        self.transport = None

    def _rejected(
        self, head: Head, status: int, reason: str, extra: bytes = b"", linger: bool = False
    ) -> None:
        self.result.refused_head = head
        self._text(status, reason)

    def _text(self, status: int, reason: str, *args: object, **kwargs: object) -> None:
        self.result.refused = status
        self.transport = None


def run_front(pieces: list[bytes]) -> FrontResult:
    result = FrontResult()
    conn = _RecordingConnection(result)
    for piece in pieces:
        if conn.transport is None:
            break
        conn.data_received(piece)
    return result


class _Handlers:
    """aiohttp request handlers as `fleetpki serve` builds them (one per connection)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = _runner(web.Application(), ConnectionLimits())
        self.loop.run_until_complete(self.runner.setup())

    def parser(self) -> Any:
        server = self.runner.server
        assert server is not None
        return server()._parser


_HANDLERS: _Handlers | None = None


def _parser() -> Any:
    global _HANDLERS
    if _HANDLERS is None:
        _HANDLERS = _Handlers()
    return _HANDLERS.parser()


def _feed(pieces: list[bytes]) -> AiohttpResult:
    result = AiohttpResult()
    parser = _parser()
    payloads = []
    try:
        for piece in pieces:
            messages, upgraded, _tail = parser.feed_data(piece)
            payloads += list(messages)
            if upgraded:
                result.error = "upgraded"
                break
    except HttpProcessingError as exc:
        result.error = f"{type(exc).__name__}: {exc.message}"
    for message, payload in payloads:
        body = b"".join(getattr(payload, "_buffer", ()))  # EmptyStreamReader has none
        result.messages.append((message, body, payload.is_eof()))
    return result


def run_aiohttp(pieces: list[bytes]) -> AiohttpResult:
    """aiohttp's messages; after an error, fed again a byte at a time so that the messages
    before the bad one are known (one feed_data that raises returns none of them)."""
    result = _feed(pieces)
    if result.error is not None and not result.error == "upgraded":
        stream = b"".join(pieces)
        result = _feed([stream[i : i + 1] for i in range(len(stream))])
    return result


def _header(message: Any, name: str) -> str | None:
    values = message.headers.getall(name, [])
    return values[0] if len(values) == 1 else None if not values else "<repeated>"


def _same_request(index: int, head: Head, body: bytes, got: tuple[Any, bytes, bool]) -> None:
    message, payload, complete = got
    where = f"request {index} ({head.path[:80]})"
    version = f"{message.version.major}.{message.version.minor}"
    checks = {
        "method": (message.method, "POST"),
        "target": (message.path, head.path),
        "version": (version, "1.0" if head.http10 else "1.1"),
        "chunked": (message.chunked, False),
        "upgrade": (message.upgrade, False),
        "Content-Length": (_header(message, "Content-Length"), str(head.length)),
        "Content-Type": (_header(message, "Content-Type"), head.content_type),
        "Authorization": (_header(message, "Authorization"), head.authorization),
        "keep-alive": (not message.should_close, head.keep_alive),
        "body": (payload, body),
        "end of request": (complete, True),
    }
    for what, (theirs, ours) in checks.items():
        if what == "Content-Length" and theirs is not None and theirs.isdigit():
            theirs = str(int(theirs))
        if theirs != ours:
            raise Disagreement(f"{where}: {what}: front end {ours!r}, aiohttp {theirs!r}")


def check(pieces: list[bytes]) -> FrontResult:
    """Feed the stream to both; raise Disagreement at the first difference."""
    ours = run_front(pieces)
    theirs = run_aiohttp(pieces)
    for index, (head, body) in enumerate(ours.served):
        if index >= len(theirs.messages):
            raise Disagreement(
                f"request {index}: the front end serves {head.path[:80]} "
                f"({head.length}-byte body), aiohttp finds no request there: {theirs.error}"
            )
        _same_request(index, head, body, theirs.messages[index])
    if ours.refused == 413:
        index = len(ours.served)
        head = ours.refused_head
        assert head is not None
        if index >= len(theirs.messages):
            raise Disagreement(f"request {index}: 413 at the front end, aiohttp: {theirs.error}")
        declared = _header(theirs.messages[index][0], "Content-Length")
        if declared is None or not declared.isdigit() or int(declared) != head.length:
            raise Disagreement(
                f"request {index}: 413 for Content-Length {head.length}, aiohttp read {declared}"
            )
    return ours
