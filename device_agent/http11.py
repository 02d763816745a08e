"""A minimal HTTP/1.1 client over asyncio streams + TLS (one request per connection).

Enough for EST: no redirects, no keep-alive, bodies capped; the base install has no aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024


class HttpError(Exception):
    """The connection failed or the peer did not speak HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        # RFC 9110 5.3: repeated fields combine with a comma.
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    # RFC 9112 7.1: size line in hex, data, CRLF; a zero-size chunk ends the body.
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailer section ends with an empty line
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise HttpError("response body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_response(reader: asyncio.StreamReader, head_only: bool) -> HttpResponse:
    """One HTTP/1.1 response from `reader` (RFC 9112 6.3: a body framed by chunked coding,
    Content-Length or the end of the connection); raises HttpError for anything else."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status, reason, headers = _parse_head(head[:-4])
        if head_only or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= MAX_BODY:
                raise HttpError(f"bad Content-Length {length}")
            body = await reader.readexactly(length)
        else:
            buf = bytearray()
            while chunk := await reader.read(65536):
                buf += chunk
                if len(buf) > MAX_BODY:
                    raise HttpError("response body too large")
            body = bytes(buf)
        return HttpResponse(status, reason, headers, body)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise HttpError(f"malformed or truncated HTTP response: {exc}") from exc


async def _exchange(
    host: str, port: int, request: bytes, ctx: ssl.SSLContext, head_only: bool
) -> HttpResponse:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=host, limit=MAX_HEADER
    )
    try:
        writer.write(request)
        await writer.drain()
        return await read_response(reader, head_only)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, TimeoutError, ssl.SSLError):
            pass  # the answer is complete; a messy TLS shutdown does not matter


async def request(
    method: str,
    host: str,
    port: int,
    path: str,
    ctx: ssl.SSLContext,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> HttpResponse:
    """One HTTPS request with `Connection: close`; raises HttpError or OSError. The caller
    bounds it with asyncio.timeout."""
    host_header = host if port == 443 else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == 443 else f"[{host}]:{port}"
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host_header}",
        "Connection: close",
        "Accept: */*",
    ]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} contains a line break")
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1") + body
    return await _exchange(host, port, raw, ctx, head_only=method == "HEAD")
