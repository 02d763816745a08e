"""DER (X.690) element framing: the few tags and lengths we read and write by hand."""

from __future__ import annotations

from collections.abc import Iterator


def encode_length(n: int) -> bytes:
    """X.690 8.1.3: the short form below 128, else the long form with the fewest octets."""
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def encode(tag: int, content: bytes) -> bytes:
    """One DER element: identifier octet, definite length, contents."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    return bytes((tag,)) + encode_length(n) + content


def encode_integer(value: int) -> bytes:
    """A non-negative INTEGER, in the fewest octets that keep it positive (X.690 8.3.2)."""
    if value < 0:
        raise ValueError(f"negative INTEGER {value} is not encoded here")
    return encode(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def read(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """(tag, contents start, contents end) of the element at `pos`; definite lengths only.

    Raises ValueError for an indefinite or truncated length: what we read is DER we built or
    that cryptography already parsed, so this is a guard, not a parser for hostile input.
    """
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or pos + count > len(data):
            raise ValueError(f"unsupported DER length octet {length:#x}")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError(f"DER element of {length} octets runs past the end of its data")
    return tag, pos, end


def children(data: bytes, start: int, end: int) -> Iterator[bytes]:
    """The whole encodings (TLVs) of the elements laid end to end in data[start:end]."""
    pos = start
    while pos < end:
        _, _, stop = read(data, pos)
        yield data[pos:stop]
        pos = stop


def contents(element: bytes) -> bytes:
    """The contents octets of one whole element."""
    _, start, end = read(element)
    return element[start:end]
