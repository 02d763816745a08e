"""The EST front end frames requests as aiohttp would (tests/est_front_differential.py).

The cases are the disagreements found by that check (by hand and by
bench/fuzz/fuzz_est_front.py): before the fix the front end served each of these requests
while aiohttp, which it promises to match, refused it or read it otherwise. The property runs
generated streams of one to three requests, cut into TCP-like pieces, through both.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enroll_server.est.front import MAX_FIELDS, MAX_LINE
from tests import est_front_differential as differential
from tests.est_front_differential import (
    ENDS,
    EST,
    METHODS,
    NAMES,
    TARGETS,
    VALUES,
    VERSIONS,
    Disagreement,
    check,
)

ENROLL = b"POST " + EST + b"simpleenroll HTTP/1.1\r\nHost: localhost\r\n"


def enroll(*fields: bytes, body: bytes = b"abc", line: bytes = ENROLL) -> bytes:
    head = line + b"".join(f + b"\r\n" for f in fields)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


FOUND = {
    # aiohttp: 400 "Invalid char in url query"; the front end served it.
    "control character in the query": enroll(
        line=b"POST " + EST + b"simpleenroll?a\x01b HTTP/1.1\r\nHost: x\r\n"
    ),
    # RFC 9110 5.5: only HTAB among the controls; aiohttp: 400 "Invalid header value char".
    "control character in a field value": enroll(b"X-Note: a\x01b"),
    "DEL in a field value": enroll(b"X-Note: a\x7fb"),
    # The front end read 'close' anywhere in the value: it closed where aiohttp kept alive.
    "Connection: noclose": enroll(b"Connection: noclose"),
    # aiohttp reads what follows an Upgrade request as the other protocol.
    "Upgrade": enroll(b"Connection: Upgrade", b"Upgrade: websocket"),
    # aiohttp's line limit: 400 "Got more than 8190 bytes"; the front end allowed 16 KiB.
    "field value over MAX_LINE": enroll(b"X-Pad: " + b"p" * (MAX_LINE + 1)),
    "request line over MAX_LINE": enroll(
        line=b"POST " + EST + b"simpleenroll?" + b"q" * MAX_LINE + b" HTTP/1.1\r\nHost: x\r\n"
    ),
    "more than MAX_FIELDS fields": enroll(*(b"X-%d: 1" % i for i in range(MAX_FIELDS))),
    # Decoded latin-1 by the front end, UTF-8 with surrogates by aiohttp: two strings.
    "obs-text in Content-Type": enroll(b"Content-Type: a\x98plication/pkcs10"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_front_end_agrees_with_aiohttp(case: str) -> None:
    stream = FOUND[case]
    check([stream])
    check([stream[:7], stream[7:]])  # the head's first line in two pieces


def test_a_served_request_that_aiohttp_refuses_is_a_disagreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check can fail: a request the front end serves and aiohttp does not find."""
    refusing = differential.AiohttpResult(error="BadHttpMessage: refused")
    monkeypatch.setattr(differential, "run_aiohttp", lambda pieces: refusing)
    with pytest.raises(Disagreement, match="aiohttp finds no request"):
        check([enroll()])


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """One to three requests, cut into pieces. Mostly enrollments the front end would serve
    (their request line, Host and a right Content-Length) with odd fields added, so that the
    property probes what it serves, not only what it hands over."""
    stream = b""
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)):
            line = b"POST %s %s" % (
                draw(st.sampled_from(TARGETS[:3])),
                draw(st.sampled_from(VERSIONS[:3])),
            )
        else:
            line = b" ".join(
                draw(st.sampled_from(choices)) for choices in (METHODS, TARGETS, VERSIONS)
            )
        length = draw(st.integers(0, 8))
        fields = [line]
        if draw(st.integers(0, 7)):
            fields.append(b"Host: localhost")
        if draw(st.integers(0, 7)):
            fields.append(b"Content-Length: %d" % length)
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(NAMES))
            value = draw(st.sampled_from(VALUES) | st.binary(max_size=6))
            fields.insert(draw(st.integers(1, len(fields))), name + b": " + value)
        end = draw(st.sampled_from(ENDS)) if not draw(st.integers(0, 7)) else b"\r\n"
        body = draw(st.binary(min_size=length, max_size=length + 2))
        stream += end.join(fields) + end + end + body
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=3)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return [p for p in pieces if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_generated_streams_are_framed_alike(pieces: list[bytes]) -> None:
    check(pieces)
