"""Fuzz the EST front end's request framing differentially against aiohttp's parser.

Each input is a byte stream a client might send on one connection, cut into TCP-like pieces;
tests/est_front_differential.check feeds it to the front end's real connection code and to
the aiohttp request parser `fleetpki serve` hands over to, and raises Disagreement when the
front end serves a request that aiohttp would read differently (another verdict, another
target, Content-Length, keep-alive, or another end of the request and so another start of
the next). By the first byte the input is either the raw stream (mutated from pipelined
enrollments) or a recipe: 1-3 requests assembled from a dictionary of request lines, field
names and values (with the odd bytes HTTP parsers disagree on: bare CR or LF, NUL, other
control characters, obs-text, obs-fold, odd Connection and Content-Length values).
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from tests.est_front_differential import (
        ENDS,
        EST,
        METHODS,
        NAMES,
        TARGETS,
        VALUES,
        VERSIONS,
        check,
    )


def recipe(fdp: atheris.FuzzedDataProvider) -> bytes:
    stream = b""
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        line = b" ".join(
            (
                fdp.PickValueInList(METHODS),
                fdp.PickValueInList(TARGETS) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2)),
                fdp.PickValueInList(VERSIONS),
            )
        )
        head = [line]
        length = fdp.ConsumeIntInRange(0, 8)
        # Mostly what the front end serves: Host and a right Content-Length, odd fields added.
        if fdp.ConsumeIntInRange(0, 7):
            head.append(b"Host: localhost")
        if fdp.ConsumeIntInRange(0, 7):
            head.append(b"Content-Length: %d" % length)
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            name = fdp.PickValueInList(NAMES)
            if fdp.ConsumeBool():
                value = fdp.PickValueInList(VALUES)
            else:
                value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6))
            if name.lower().strip() == b"content-length" and fdp.ConsumeBool():
                value = b"%d" % length
            head.append(name + b":" + fdp.PickValueInList([b" ", b"", b"\t"]) + value)
        end = fdp.PickValueInList(ENDS)
        body = fdp.ConsumeBytes(length + fdp.ConsumeIntInRange(0, 2))
        stream += end.join(head) + end + end + body
    return stream


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    if data[0] & 1:
        stream = recipe(fdp)
    else:
        stream = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    cuts = sorted({fdp.ConsumeIntInRange(0, len(stream)) for _ in range(data[0] >> 5)})
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    check([p for p in pieces if p])


def seeds() -> list[bytes]:
    body = b"MIIBxyz="
    enroll = (
        b"POST " + EST + b"simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/pkcs10\r\nAuthorization: Basic ZGV2OnRvaw==\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    reenroll = enroll.replace(b"simpleenroll", b"simplereenroll").replace(
        b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n"
    )
    old = enroll.replace(b"HTTP/1.1", b"HTTP/1.0").replace(
        b"Host: localhost\r\n", b"Connection: keep-alive\r\n"
    )
    get = b"GET " + EST + b"cacerts HTTP/1.1\r\nHost: localhost\r\n\r\n"
    raw = [enroll + enroll, enroll + get, old + reenroll, enroll[:40]]
    out = [b"\x00\x00\x00\x00\x00" + stream for stream in raw]
    out += [b"\x40" + stream for stream in raw]  # two cuts
    out += [b"\x01" + bytes(range(64)), b"\x21" + b"\x03" * 80]
    return out


if __name__ == "__main__":
    _harness.main("est_front", test_one_input, seeds)
